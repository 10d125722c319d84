"""Ranges of every numeric setting, in one table per front end: a bad value is one line saying what fits.

A `Range` row reads: option `name` is an int (or a float) in `low..high` (`low` excluded when
`open_low`), `None` allowed when `optional`. New settings are one more row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
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

def check_all(obj: Any, table: Iterable[Range], flags: dict[str, str] | None = None) -> None:
    """Check the attributes of `obj` named in `table`; the first bad one raises a one-line UsageError."""
    for r in table:
        r.check(getattr(obj, r.name), (flags or {}).get(r.name))


def check_types(obj: Any) -> None:
    """The str and bool fields of dataclass `obj` hold str and bool (a tampered config.json or checkpoint may not)."""
    kinds = {"str": (str,), "bool": (bool,)}
    for f in fields(obj):
        parts = [p.strip() for p in str(f.type).split("|")]
        base = [p for p in parts if p != "None"]
        if len(base) != 1 or base[0] not in kinds:
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in parts:
            continue
        if not isinstance(value, kinds[base[0]]):
            raise UsageError(f"setting {f.name} must be a {base[0]} (got {value!r})")


# `mrml train` and RunConfig (the Python API validates the same table)
RUN_RANGES: tuple[Range, ...] = (
    Range("image_size", int, 1, 1024, optional=True, hint="image side in pixels"),
    Range("ways", int, 1, 10**5),
    Range("shots", int, 1, 10**5),
    Range("query", int, 1, 10**5),
    Range("inner_steps", int, 0, 10**6),
    Range("inner_lr", float, 0, LR_MAX, open_low=True),
    Range("inner_tol", float, 0, LR_MAX, open_low=True),
    Range("l2", float, 0, LR_MAX, optional=True),
    Range("cg_steps", int, 0, 10**6),
    Range("cg_tol", float, 0, LR_MAX),
    Range("test_steps", int, 0, 10**6),
    Range("test_lr", float, 0, LR_MAX, open_low=True),
    Range("task_chunk", int, 1, 10**5),
    Range("width", int, 1, 4096, optional=True, hint="leave it out for the backbone's default"),
    Range("meta_batch", int, 1, 10**5),
    Range("iterations", int, 0, BIG),
    Range("outer_lr", float, 0, LR_MAX, open_low=True),
    Range("seed", int, 0, SEED_MAX),
    Range("eval_seed", int, 0, SEED_MAX),
    Range("threads", int, 1, 1024, optional=True),
    Range("log_every", int, 1, BIG),
    Range("val_every", int, 1, BIG),
    Range("val_episodes", int, 1, EPISODES_MAX),
    Range("test_episodes", int, 1, EPISODES_MAX),
    Range("checkpoint_every", int, 1, BIG),
    Range("dist_timeout", float, 0, 10**7, open_low=True, hint="seconds, e.g. 600"),
)

# `mrml eval`
EVAL_RANGES: tuple[Range, ...] = (
    Range("episodes", int, 1, EPISODES_MAX),
    Range("seed", int, 0, SEED_MAX, optional=True),
)

# `mrml bench memory` (BenchSettings)
BENCH_RANGES: tuple[Range, ...] = (
    Range("image_size", int, 1, 1024, optional=True),
    Range("channels", int, 1, 64),
    Range("width", int, 1, 4096, optional=True),
    Range("ways", int, 1, 10**5),
    Range("shots", int, 1, 10**5),
    Range("query", int, 1, 10**5),
    Range("meta_batch", int, 1, 10**5),
    Range("repeats", int, 1, 10**4),
    Range("cg_steps", int, 0, 10**6),
    Range("seed", int, 0, SEED_MAX),
    Range("threads", int, 1, 1024, optional=True),
    Range("timeout", float, 0, 10**7, open_low=True, hint="seconds per configuration"),
)
