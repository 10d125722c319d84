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
from .metasgd import MetaSGD
from .mrml import MRML
from .protonet import ProtoNet
from .reptile import Reptile

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    "mrml": MRML, "maml": MAML, "fomaml": FOMAML, "anil": ANIL, "itd-bio": ITDBiO, "imaml": IMAML,
    "reptile": Reptile, "protonet": ProtoNet, "metasgd": MetaSGD,
}


def register_algorithm(cls: type[MetaAlgorithm]) -> type[MetaAlgorithm]:
    """Register `cls` under `cls.name` for `build_algorithm` (a class decorator; a name already
    taken is replaced).

    Args:
        cls: a `MetaAlgorithm` subclass with its own `name`.

    Returns:
        `cls` itself.

    Example:
        >>> @register_algorithm
        ... class SlowMRML(MRML):
        ...     name = "slow-mrml"
        ...     default_l2 = 1.0
        >>> from torch import nn
        >>> learner = build_algorithm("slow-mrml", nn.Sequential(nn.Linear(4, 3)), "classification",
        ...                           AlgoConfig(inner="0"))
        >>> type(learner).__name__, learner.config.l2
        ('SlowMRML', 1.0)
        >>> del ALGORITHMS["slow-mrml"]  # unregister
    """
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(name: str, model: nn.Module, loss: TaskLoss | str | Callable, config: AlgoConfig | None = None,
                    **kwargs: Any) -> MetaAlgorithm:
    """The algorithm registered as `name` (`ALGORITHMS`), built over `model`.

    Args:
        name: mrml, maml, fomaml, anil, itd-bio, imaml, reptile, protonet, metasgd, or a registered name.
        model, loss, config: as for `MetaAlgorithm`.
        **kwargs: further constructor arguments (`trunk=`, `inner_loss=`; see `MetaAlgorithm`).

    Returns:
        The `MetaAlgorithm` instance.

    Raises:
        UsageError: an unknown name (or what the constructor raises).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> learner = build_algorithm("anil", model, "classification", trunk="0")
        >>> type(learner).__name__, learner.config.inner
        ('ANIL', '2.weight,2.bias')
        >>> build_algorithm("mamll", model, "classification")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mrml.errors.UsageError: unknown algorithm 'mamll': expected one of anil, fomaml, imaml, itd-bio, maml, ...
    """
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {name!r}: expected one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](model, loss, config, **kwargs)


__all__ = ["ALGORITHMS", "ANIL", "AlgoConfig", "CallableLoss", "FOMAML", "IMAML", "ITDBiO", "MAML", "MetaAlgorithm", "MetaSGD", "MRML",
           "ProtoNet", "Reptile", "StepStats", "TaskLoss", "build_algorithm", "make_loss", "register_algorithm"]
