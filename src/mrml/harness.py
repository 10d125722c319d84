"""The measuring harness shared by `mrml bench memory` and benchmarks/speed.py.

One meta-iteration as a step function (`meta_step`), the device sync around it (`sync`), a warm-up,
a metered and a timed step (`warm_up`, `metered`, `timed`), the ratio check behind every target
(`ratio_check`), fixed-width text tables (`columns`, `table`) and the two-panel figure of peak memory
and seconds (`two_panels`, `PANEL_LABELS`, `save`). Each front end keeps its own configurations,
record keys and wording; what they measure and how is this module.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

Step = Callable[[list], float]

#: axis label of each measured quantity (record key -> label)
PANEL_LABELS = {"peak_mb": "peak memory per meta-iteration (MiB)", "seconds": "seconds per meta-iteration"}


def meta_step(algo: Any, optimizer: torch.optim.Optimizer) -> Step:
    """One meta-iteration: `algo.meta_gradient(episodes)` then `optimizer.step()`; returns the query loss.

    Args:
        algo: A `MetaAlgorithm` (anything with `meta_gradient(episodes) -> StepStats`).
        optimizer: The outer optimizer over `algo.outer_parameters()`.

    Returns:
        A function of a list of episodes returning the meta-batch's mean query loss.

    Example:
        >>> class Const:  # a stand-in algorithm
        ...     def meta_gradient(self, eps):
        ...         return type("S", (), {"loss": float(len(eps))})()
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> meta_step(Const(), torch.optim.SGD([p], lr=0.1))([None, None])
        2.0
    """
    def step(episodes: list) -> float:
        stats = algo.meta_gradient(episodes)
        optimizer.step()
        return stats.loss

    return step


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def warm_up(step: Step, batch: list, device: torch.device | str) -> float:
    """One unmeasured step (optimizer state and lazy initialisation exist afterwards); returns its seconds."""
    t0 = time.perf_counter()
    step(batch)
    sync(device)
    return time.perf_counter() - t0


def metered(step: Step, batch: list, device: torch.device | str) -> tuple[Any, float]:
    """One step under `mrml.memory.PeakMemoryMeter`; returns (its MemoryReport, the step's loss)."""
    from .memory import PeakMemoryMeter

    with PeakMemoryMeter(torch.device(device)) as meter:
        loss = step(batch)
        sync(device)
    return meter.report(), loss


def timed(step: Step, batch: list, device: torch.device | str) -> tuple[float, float]:
    """One step timed with `time.perf_counter`, synced before and after; returns (seconds, loss).

    Example:
        >>> seconds, loss = timed(lambda eps: 0.5, [], "cpu")
        >>> seconds >= 0, loss
        (True, 0.5)
    """
    sync(device)
    t0 = time.perf_counter()
    loss = step(batch)
    sync(device)
    return time.perf_counter() - t0, loss


def ratio_check(num: float, den: float, op: str, bound: float) -> tuple[float, bool]:
    """A target's verdict: (num / den, whether it is `op` ("<=" or ">=") `bound`).

    Example:
        >>> ratio_check(3.0, 2.0, "<=", 1.2), ratio_check(8.0, 2.0, ">=", 4.0)
        ((1.5, False), (4.0, True))
    """
    if op not in ("<=", ">="):
        raise ValueError(f"op must be <= or >= (got {op!r})")
    value = num / den
    return value, bool(value <= bound if op == "<=" else value >= bound)


def columns(cells: Sequence[tuple[Any, int]], sep: str = "") -> str:
    """One table row: each (text, width) right-aligned in `width`, left-aligned in `-width`.

    Example:
        >>> columns([("algo", -6), ("K", 3), (1.5, 6)], sep=" ")
        'algo     K    1.5'
    """
    return sep.join(f"{str(text):<{-w}}" if w < 0 else f"{str(text):>{w}}" for text, w in cells)


def table(head: str, rows: Sequence[str]) -> str:
    """The header, a rule of dashes as long, and the rows, one per line."""
    return "\n".join([head, "-" * len(head), *rows])


def two_panels(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib Figure (no pyplot, no display needed) with two side-by-side axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, 2)


def save(fig: Any, path: str | Path, dpi: int = 110) -> None:
    fig.savefig(str(path), dpi=dpi)
