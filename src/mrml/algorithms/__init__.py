"""Meta-learning algorithms by name, all over one interface (`MetaAlgorithm`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UsageError
from .base import AlgoConfig, MetaAlgorithm, StepStats
from .losses import TaskLoss
from .mrml import MRML

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {"mrml": MRML}


def register_algorithm(cls: type[MetaAlgorithm]) -> type[MetaAlgorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(name: str, model: nn.Module, loss: TaskLoss | str, config: AlgoConfig) -> MetaAlgorithm:
    """The algorithm `name` over `model`; raises UsageError for an unknown name."""
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {name!r}: expected one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](model, loss, config)


__all__ = ["ALGORITHMS", "AlgoConfig", "MetaAlgorithm", "MRML", "StepStats", "TaskLoss", "build_algorithm", "register_algorithm"]
