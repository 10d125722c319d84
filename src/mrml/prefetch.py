"""The training loop's episodes, prepared `ahead` meta-iterations in advance on a background thread.

Episode n of a run is a pure function of (seed, n): its draw comes from `episode_rng(seed, "train", n)`
and its augmentation from the counter position `n * ways` (`train.seek_augmentation`), so preparing
the next iterations early, on another thread, gives the episodes the serial loop would draw, bit for
bit. One thread prepares them in iteration order and is the only user of the training split's
augmentation counter (validation and test read other splits).

A thread, not worker processes: decoding (PIL, numpy indexing, torch resize) releases the GIL for most
of its time, a run prepares at most tens of ms of episodes per meta-iteration, and a thread needs no
picklable dataset (a registered or `from_arrays` source, a memory-mapped array) and no start-up
(a spawned worker re-imports torch: seconds). On CUDA the episodes are pinned in the thread and copied
with `non_blocking=True` on the training thread's stream; on CPU they are made exactly as before.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import fields
from typing import Any, Callable

import torch

from . import pytree
from .data.base import Episode

_POLL_S = 0.05  # how often a blocked side looks whether the other stopped


class EpisodePrefetcher:
    """Runs `make(it)` for it = start, ..., stop - 1 on a daemon thread, at most `ahead` results in advance.

    `get(it)` hands them over in order. An exception raised by `make` (e.g. a damaged image file) is
    raised by `get` for that iteration, the same exception object, after the iterations before it were
    handed over. `close()` (also on leaving a `with` block) stops the thread and waits for it.

    Example:
        >>> with EpisodePrefetcher(lambda it: it * it, 2, 5, ahead=2) as pf:
        ...     [pf.get(it) for it in range(2, 5)]
        [4, 9, 16]
    """

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, ahead: int):
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1 (got {ahead})")
        self._make, self._next = make, start
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(start, stop), name="mrml-episodes", daemon=True)
        self.thread.start()

    def _work(self, start: int, stop: int) -> None:
        for it in range(start, stop):
            try:
                item = (self._make(it), None)
            except BaseException as e:  # noqa: BLE001 - every failure goes to the training thread
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[1] is not None:
                return

    def get(self, iteration: int) -> Any:
        """What `make(iteration)` returned (or raised); iterations are taken in order."""
        if iteration != self._next:
            raise RuntimeError(f"episodes of iteration {self._next} are next, not of {iteration}")
        while True:
            try:
                value, error = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the episode thread stopped before iteration {iteration}") from None
        self._next += 1
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Stop the thread (after the episode it is preparing) and wait for it; drop what it prepared."""
        self._stop.set()
        self.thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "EpisodePrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned(ep: Episode) -> Episode:
    """The episode in page-locked host memory (asynchronous copies to the GPU need it)."""
    return Episode(*(pytree.tree_map(torch.Tensor.pin_memory, getattr(ep, f.name)) for f in fields(ep)))


def to_device(ep: Episode, device: torch.device) -> Episode:
    """The (pinned, already cast) episode copied to `device` without waiting for the copy."""
    return Episode(*(pytree.tree_map(lambda t: t.to(device, non_blocking=True), getattr(ep, f.name))
                     for f in fields(ep)))


class EpisodeFeed:
    """`feed(it)`: the episodes `run.episodes(it, indices)` gives, prepared ahead when `ahead` > 0.

    `run` is a `train.Run` (its `episodes`, `device`, `dtype`); iterations are taken in order from
    `start` up to `stop`. `waited` adds up the seconds the caller spent in `feed` (the data wait).
    Close it (`close()` or a `with` block) when training stops, however it stops.
    """

    def __init__(self, run: Any, start: int, stop: int, indices: range, ahead: int):
        self.run, self.indices = run, indices
        self.waited = 0.0
        self.cuda = run.device.type == "cuda"
        self.prefetcher = EpisodePrefetcher(self._make, start, stop, ahead) if ahead > 0 and stop > start else None

    def _make(self, iteration: int) -> list[Episode]:
        if not self.cuda:
            return self.run.episodes(iteration, self.indices)
        return [pinned(ep) for ep in self.run.episodes(iteration, self.indices, device=torch.device("cpu"))]

    def __call__(self, iteration: int) -> list[Episode]:
        t0 = time.perf_counter()
        try:
            if self.prefetcher is None:
                return self.run.episodes(iteration, self.indices)
            eps = self.prefetcher.get(iteration)
            return [to_device(ep, self.run.device) for ep in eps] if self.cuda else eps
        finally:
            self.waited += time.perf_counter() - t0

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def __enter__(self) -> "EpisodeFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
