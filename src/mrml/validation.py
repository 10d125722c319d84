"""Ranges of numeric settings: a bad value is one line saying what fits.

The settings of `mrml train` (RunConfig, AlgoConfig) and `mrml bench memory` (BenchSettings) declare
their ranges with `ints`/`floats` in their fields' metadata (`mrml.settings`); options that are not
such settings (those of `mrml eval`) are rows of a table checked by `check_all`.

A `Range` row reads: option `name` is an int (or a float) in `low..high` (`low` excluded when
`open_low`), `None` allowed when `optional`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import UsageError

SEED_MAX = 2**32 - 1  # numpy and torch seeds
BIG = 10**9  # counts of iterations or steps: more is a typo, not a run
EPISODES_MAX = 10**7
FLOAT_MAX = 1.7976931348623157e308
LR_MAX = 1e38  # step sizes and strengths: float32 parameters overflow beyond


@dataclass(frozen=True)
class Range:
    name: str
    kind: type  # int or float
    low: float
    high: float
    open_low: bool = False  # low itself excluded (a float > low)
    optional: bool = False  # None allowed (the default chosen elsewhere)
    hint: str = ""  # how to fix, appended to the message

    def check(self, value: Any, flag: str | None = None) -> None:
        flag = flag or "--" + self.name.replace("_", "-")
        if value is None and self.optional:
            return
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
            what, bound = "an integer", f">= {self.low} and <= {self.high}"
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and (value > self.low if self.open_low else value >= self.low) and value <= self.high)
            what, bound = "a finite number", f"{'>' if self.open_low else '>='} {self.low:g}"
            if self.high < FLOAT_MAX:
                bound += f" and <= {self.high:g}"
        if not ok:
            raise UsageError(f"{flag} must be {bound} ({what}; got {value!r}){'; ' + self.hint if self.hint else ''}")


def ints(low: int, high: int, hint: str = "") -> Range:
    """Integers in low..high (the range of a declared setting: its name is the field's)."""
    return Range("", int, low, high, hint=hint)


def floats(low: float, high: float, open_low: bool = False, hint: str = "") -> Range:
    """Finite numbers in low..high (`low` itself excluded when `open_low`)."""
    return Range("", float, low, high, open_low=open_low, hint=hint)


def check_all(obj: Any, table: Iterable[Range], flags: dict[str, str] | None = None) -> None:
    """Check the attributes of `obj` named in `table`; the first bad one raises a one-line UsageError."""
    for r in table:
        r.check(getattr(obj, r.name), (flags or {}).get(r.name))


# `mrml eval`
EVAL_RANGES: tuple[Range, ...] = (
    Range("episodes", int, 1, EPISODES_MAX),
    Range("seed", int, 0, SEED_MAX, optional=True),
)
