"""Shared fixtures: a tiny in-memory image dataset registered as `tiny`, and tests/ on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import pytest

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny tensors: threads only add contention

from mrml.data.base import ArrayClassImages, FewShotDataset  # noqa: E402
from mrml.data.registry import register  # noqa: E402


def tiny_dataset(classes: int = 12, per_class: int = 8, size: int = 16, seed: int = 0) -> FewShotDataset:
    """Classes are noisy copies of a random prototype image: learnable, and fast."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, size, size))
    arrays = [np.clip(p + rng.normal(0, 40, size=(per_class, size, size)), 0, 255).astype(np.uint8) for p in protos]
    names = [f"c{i}" for i in range(classes)]
    third = classes // 3
    cut = {"train": slice(0, classes - 2 * third), "validation": slice(classes - 2 * third, classes - third),
           "test": slice(classes - third, classes)}
    return FewShotDataset("tiny", {k: ArrayClassImages(names[s], arrays[s]) for k, s in cut.items()})


@register("tiny")
def _build_tiny(root=None, **options) -> FewShotDataset:
    return tiny_dataset()


@pytest.fixture
def tiny() -> FewShotDataset:
    return tiny_dataset()
