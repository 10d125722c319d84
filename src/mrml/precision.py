"""Mixed precision for the trunk forward: `AlgoConfig.amp` = None | "bf16" | "fp16".

Only the trunk (the part run once per image set, with gradient) is autocast; its features are cast
back to the parameters' dtype before the inner loop, so the inner loop, the conjugate gradient and
the Hessian-vector products run in full precision (float32). bf16 autocast works on CUDA and CPU;
fp16 is meant for CUDA and has no loss scaling here (gradients through the trunk may underflow):
prefer bf16.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import UsageError

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting (None: no autocast); UsageError for an unknown name."""
    if amp is None or amp in ("", "none", "off", "fp32"):
        return None
    if amp not in AMP_DTYPES:
        raise UsageError(f"unknown mixed precision {amp!r}: expected one of {', '.join(AMP_DTYPES)} (or none)")
    return AMP_DTYPES[amp]


def autocast(device: torch.device | str, amp: str | None) -> ContextManager:
    """`torch.autocast` on `device` for `amp`, or a no-op context when `amp` is unset."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)
