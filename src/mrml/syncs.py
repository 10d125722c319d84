"""Count host-device synchronisations: the tensor-to-Python conversions a GPU must stall its stream for.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` reports every synchronising call; it does nothing
on CPU, where the tests run. `count_host_syncs()` counts what makes a sync on any device from Python:
`.item()`, `.tolist()`, `.numpy()`, `bool(t)` (an `if` on a tensor), `float(t)`, `int(t)`, `t.__index__`
(indexing a list with a tensor), and `.nonzero()` / boolean-mask indexing (data-dependent output
shapes). It cannot see syncs made inside C++ (a CUDA `linalg` call that checks its own `info`), which
is what the CUDA sync debug mode is for (benchmarks/gpu_check.sh runs both).

Example:
    >>> import torch
    >>> from mrml.syncs import count_host_syncs
    >>> t = torch.ones(3)
    >>> with count_host_syncs() as counter:
    ...     _ = float(t.sum()); _ = t.tolist(); _ = (t * 2).sum()
    >>> counter.total, dict(counter.by_kind)
    (2, {'__float__': 1, 'tolist': 1})
"""
from __future__ import annotations

import collections
import contextlib
import threading
import traceback
from typing import Any, Callable, Iterator

import torch

#: the Tensor methods that hand a value to Python (each one a sync on an accelerator)
CONVERSIONS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")


class SyncCounter:
    """What `count_host_syncs` saw: `total`, `by_kind` (method -> count), and with `where=True` the
    calling line of each (`by_site`: 'file:line' -> count)."""

    def __init__(self, where: bool = False) -> None:
        self.total = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.by_site: collections.Counter[str] = collections.Counter()
        self.where = where
        self._depth = threading.local()

    def _wrap(self, name: str, original: Callable) -> Callable:
        counter = self

        def counted(self_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            depth = getattr(counter._depth, "n", 0)
            if depth == 0:  # a conversion that calls another (item -> __float__) counts once
                counter.total += 1
                counter.by_kind[name] += 1
                if counter.where:
                    frame = traceback.extract_stack(limit=2)[0]  # the caller
                    counter.by_site[f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"] += 1
            counter._depth.n = depth + 1
            try:
                return original(self_, *args, **kwargs)
            finally:
                counter._depth.n = depth

        return counted


@contextlib.contextmanager
def count_host_syncs(where: bool = False) -> Iterator[SyncCounter]:
    """Count tensor-to-host conversions made in the block (any thread); see the module docstring."""
    counter = SyncCounter(where)
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
    getitem = torch.Tensor.__getitem__

    def masked_getitem(self_: torch.Tensor, index: Any) -> Any:
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            counter.total += 1
            counter.by_kind["bool-mask index"] += 1
        return getitem(self_, index)

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counter._wrap(name, original))
        torch.Tensor.__getitem__ = masked_getitem  # type: ignore[method-assign]
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
