"""Peak memory of live tensors during a block of code, on any device.

`PeakMemoryMeter` is a TorchDispatchMode: every operator's outputs are inspected, storages seen for
the first time are counted (views share their base's storage, so they cost nothing), and each
counted storage is uncounted when it is freed (a weak reference to its Python object, which torch
keeps alive exactly as long as the storage). Storages that existed before the block (parameters,
inputs, old gradients) are recognised when they first appear as operator inputs and never counted.
On CUDA, `torch.cuda.max_memory_allocated` is read as a cross-check.

`TorchDispatchMode` is documented in PyTorch's "Extending PyTorch" notes but lives in the private
module `torch.utils._python_dispatch` (no public path exists in torch 2.13): it is the one private
import of the package, and why pyproject's torch floor is the version CI tests (.ci/run).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .pytree import leaves

MiB = float(2**20)


@dataclass
class MemoryReport:
    """Peak bytes above the starting point, by meter: 'dispatch' (live tensors) and 'cuda' (allocator)."""

    peak_bytes: int
    cuda_peak_bytes: int | None = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MiB

    @property
    def cuda_peak_mb(self) -> float | None:
        return None if self.cuda_peak_bytes is None else self.cuda_peak_bytes / MiB


class PeakMemoryMeter(TorchDispatchMode):
    """Context manager: `with PeakMemoryMeter() as m: ...; m.report().peak_mb`."""

    def __init__(self, device: torch.device | str | None = None):
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.current = 0
        self.peak = 0
        self._counted: dict[int, tuple[weakref.ref, int]] = {}
        self._known: dict[int, weakref.ref] = {}
        self._cuda_start: int | None = None
        self._cuda_peak: int | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def _forget(self, key: int, nbytes: int) -> None:
        if self._counted.pop(key, None) is not None:
            self.current -= nbytes

    def _mark_known(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key not in self._counted and key not in self._known:
            self._known[key] = weakref.ref(st, lambda _r, k=key: self._known.pop(k, None))

    def _count(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._known:
            return
        nbytes = st.nbytes()
        entry = self._counted.get(key)
        if entry is not None:
            if entry[1] != nbytes:  # resized in place
                self.current += nbytes - entry[1]
                self._counted[key] = (entry[0], nbytes)
            return
        ref = weakref.ref(st, lambda _r, k=key, n=nbytes: self._forget(k, self._counted.get(k, (None, n))[1]))
        self._counted[key] = (ref, nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for a in leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and not a.is_meta:
                self._mark_known(a)
        out = func(*args, **kwargs)
        for o in leaves(out):
            if isinstance(o, torch.Tensor) and not o.is_meta:
                self._count(o)
        return out

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "PeakMemoryMeter":
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._cuda_start is not None:
            torch.cuda.synchronize(self.device)
            self._cuda_peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_start

    def report(self) -> MemoryReport:
        return MemoryReport(self.peak, self._cuda_peak)
