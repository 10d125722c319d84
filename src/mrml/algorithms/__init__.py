"""Meta-learning algorithms by name, all over one interface (`MetaAlgorithm`)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import UsageError
from .anil import ANIL
from .base import AlgoConfig, MetaAlgorithm, StepStats
from .imaml import IMAML
from .itd_bio import ITDBiO
from .losses import CallableLoss, TaskLoss, make_loss
from .maml import FOMAML, MAML
from .mrml import MRML
from .protonet import ProtoNet
from .reptile import Reptile

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    "mrml": MRML, "maml": MAML, "fomaml": FOMAML, "anil": ANIL, "itd-bio": ITDBiO, "imaml": IMAML,
    "reptile": Reptile, "protonet": ProtoNet,
}


def register_algorithm(cls: type[MetaAlgorithm]) -> type[MetaAlgorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(name: str, model: nn.Module, loss: TaskLoss | str | Callable, config: AlgoConfig | None = None,
                    **kwargs: Any) -> MetaAlgorithm:
    """The algorithm `name` over `model`; `kwargs` (`trunk=`, `inner_loss=`) go to its constructor
    (see `MetaAlgorithm`). Raises UsageError for an unknown name."""
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {name!r}: expected one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](model, loss, config, **kwargs)


__all__ = ["ALGORITHMS", "ANIL", "AlgoConfig", "CallableLoss", "FOMAML", "IMAML", "ITDBiO", "MAML", "MetaAlgorithm", "MRML",
           "ProtoNet", "Reptile", "StepStats", "TaskLoss", "build_algorithm", "make_loss", "register_algorithm"]
