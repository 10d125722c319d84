"""SIGINT and SIGTERM: raise `Interrupted` at once, or, inside `deferred()`, note them for the loop to act on.

The training loop runs under `deferred()`: a signal never lands mid-step or mid-write; the loop reads
`pending()` where stopping is clean, and opens `interruptible()` windows (validation) where it may
stop at once because nothing is half-done. A second SIGINT while deferred stops at once, forced.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"defer": False, "pending": None}


def _handler(signum: int, frame: object) -> None:
    if _state["pending"] is None:
        _state["pending"] = signum
    elif _state["defer"] and signum == signal.SIGINT:  # Ctrl-C twice: the user will not wait for the step
        raise Interrupted(signum, forced=True)
    if not _state["defer"]:
        raise Interrupted(signum)


def install() -> dict[int, object]:
    """Route SIGINT and SIGTERM to `Interrupted` (main thread only; a no-op elsewhere); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def restore(handlers: dict[int, object]) -> None:
    for s, h in handlers.items():
        signal.signal(s, h)  # type: ignore[arg-type]


def pending() -> int | None:
    """The first signal received since `deferred()` began, if any."""
    return _state["pending"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Note signals instead of raising them, for the body's life (the handlers before it are put back after)."""
    handlers = install()
    old = dict(_state)
    _state.update(defer=True, pending=None)
    try:
        yield
    finally:
        _state.update(defer=old["defer"], pending=None)
        restore(handlers)


@contextlib.contextmanager
def interruptible(allowed: bool = True) -> Iterator[None]:
    """Within `deferred()`: raise `Interrupted` at once (also for a signal already pending) while `allowed`."""
    if not allowed:
        yield
        return
    if _state["pending"] is not None:
        raise Interrupted(_state["pending"])
    _state["defer"] = False
    try:
        yield
    finally:
        _state["defer"] = True
