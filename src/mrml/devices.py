"""The torch device of a `--device` setting, checked (below config and train: both use it)."""
from __future__ import annotations

import torch

from .errors import UsageError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of `--device NAME`: auto, cpu, cuda, cuda:N (CUDA present, N below its device count)
    or mps (where available); anything else (meta, cpu:5, ...) is a one-line UsageError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    expected = "expected auto, cpu, cuda or cuda:N (CUDA), or mps (Apple)"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {name!r}: {expected}") from None
    if dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index not in (None, 0)):
        raise UsageError(f"device {name!r} cannot run mrml: {expected}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"device {name!r} asked for but MPS (Apple GPU) is not available here: use --device cpu")
    return dev
