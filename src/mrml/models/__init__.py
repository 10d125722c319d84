"""Backbones and heads by name (`build_model`), and the split of a model into trunk and inner part."""
from __future__ import annotations

from .backbones import BACKBONES, FewShotNet, build_model
from . import resnet  # noqa: F401  (registers the "resnet12" backbone)
from .split import ModelSplit, split_model

__all__ = ["BACKBONES", "FewShotNet", "ModelSplit", "build_model", "split_model"]
