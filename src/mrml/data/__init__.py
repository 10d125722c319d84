"""Task sources: seeded episodes from class-disjoint splits (`build_dataset(name, root)`, `from_arrays(...)`)."""
from __future__ import annotations

from .arrays import conform, from_arrays
from .base import SPLITS, ArrayClassImages, ClassImages, Episode, FewShotDataset, episode_rng
from .registry import build_dataset, dataset_names, register

__all__ = ["SPLITS", "ArrayClassImages", "ClassImages", "Episode", "FewShotDataset", "build_dataset", "conform",
           "dataset_names", "episode_rng", "from_arrays", "register"]
