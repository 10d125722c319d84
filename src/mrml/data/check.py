"""`mrml data check`: is a benchmark on disk complete and in a format mrml reads? A table, or one line saying why not."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from .base import SPLITS
from .benchmarks import build_benchmark
from .formats.preprocess import PreparedImages
from .safe_pickle import one_line


def _split_row(name: str, part: PreparedImages) -> list[str]:
    """Counts of one split, after reading the first image of every class (decoding it if stored encoded)."""
    raw = part.raw
    counts = [raw.count(c) for c in range(raw.num_classes)]
    firsts = [raw.raw(c, np.array([0])) for c in range(raw.num_classes)]
    shapes = sorted({f.shape[1:] for f in firsts})
    dtypes = sorted({str(f.dtype) for f in firsts})
    if len(shapes) != 1:
        raise DataError(f"{raw.where}: images of the {name} split have several shapes: {', '.join(map(str, shapes[:3]))}")
    part.images(0, np.array([0]))  # the model-input path works end to end
    image = "x".join(map(str, shapes[0])) + " " + "/".join(dtypes)
    return [name, str(raw.num_classes), str(sum(counts)), f"{min(counts)}-{max(counts)}", image]


def check_dataset(name: str, root: str | Path, split_file: str | Path | None = None) -> str:
    """Detect and read benchmark `name` under `root`, verify it against its split, return a summary table.

    Raises DataError (one line) naming what is wrong: missing files, a web page instead of a
    pickle, a truncated file, wrong image shapes or dtypes, classes the split needs but the files lack.
    """
    dataset = build_benchmark(name, root, split_file=split_file)
    info = dataset.info
    rows = [["split", "classes", "images", "per class", "image (as read)"]]
    rows += [_split_row(s, dataset.splits[s]) for s in SPLITS]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) if i in (0, 4) else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    c, h, w = info["input_shape"]
    lines = [
        f"{name}: format {info['format']} in {info['folder']}",
        f"split file: {info['split_file']}",
        *table,
        f"model input: {c}x{h}x{w} float32, {'normalised per channel' if info['normalised'] else 'in [0, 1]'}",
        *(f"warning: {note}" for note in info["notes"]),
        "ok" if not info["notes"] else f"ok, with {len(info['notes'])} warning(s)",
    ]
    return "\n".join(lines)


def check_main(dataset: str, root: str | Path, split_file: str | Path | None = None) -> int:
    """Print the summary table and return 0, or print `error: <reason>` to stderr and return 2."""
    try:
        print(check_dataset(dataset, root, split_file))
    except UsageError as exc:  # DataError included
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
