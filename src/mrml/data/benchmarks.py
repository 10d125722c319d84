"""The few-shot benchmarks read from the user's files: CIFAR-FS, FC100, miniImageNet, tieredImageNet, Omniglot.

`build_benchmark(name, root, ...)` detects the format under `root`, reads it against the class split
(canonical, or `split_file`), and returns a `FewShotDataset` whose images are preprocessed the way
the field does for that dataset. Each name is registered with `mrml.data.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError, UsageError
from .base import SPLITS, FewShotDataset
from .formats.cifar import CIFAR100_PYTHON, R2D2, TADAM, metaoptnet_layout
from .formats.imagenet import MINI_CACHE, MINI_METAOPTNET, TIERED_NPZ, TIERED_PNG
from .formats.layouts import Layout, Request, detect
from .formats.omniglot import OMNIGLOT
from .formats.preprocess import CIFAR100_MEAN, CIFAR100_STD, IMAGENET84_MEAN, IMAGENET84_STD, PreparedImages, Preprocess
from .formats.sources import RawClasses, RotatedClasses
from .formats.splits import ClassSplit, load_split
from .registry import register


@dataclass(frozen=True)
class Benchmark:
    """A dataset's accepted layouts (tried in order) and its preprocessing conventions."""

    layouts: tuple[Layout, ...]
    size: int  # side of the model input unless `image_size` says otherwise
    channels: int
    mean: Sequence[float] | None
    std: Sequence[float] | None
    padding: int  # zero padding of the training random crop; 0: no augmentation for this dataset


BENCHMARKS: dict[str, Benchmark] = {
    "cifar-fs": Benchmark((CIFAR100_PYTHON, R2D2, metaoptnet_layout("CIFAR_FS")), 32, 3, CIFAR100_MEAN, CIFAR100_STD, 4),
    "fc100": Benchmark((CIFAR100_PYTHON, metaoptnet_layout("FC100"), TADAM), 32, 3, CIFAR100_MEAN, CIFAR100_STD, 4),
    "mini-imagenet": Benchmark((MINI_CACHE, MINI_METAOPTNET), 84, 3, IMAGENET84_MEAN, IMAGENET84_STD, 8),
    "tiered-imagenet": Benchmark((TIERED_PNG, TIERED_NPZ), 84, 3, IMAGENET84_MEAN, IMAGENET84_STD, 8),
    "omniglot": Benchmark((OMNIGLOT,), 28, 1, None, None, 0),  # strokes = 1 on 0, not normalised
}
OPTIONS = ("split_file", "augment", "rotations", "seed", "image_size")


def _check_counts(raw: dict[str, RawClasses], split: ClassSplit, notes: list[str]) -> None:
    """Zero images in a class is an error; fewer than the split file expects is a note."""
    for name in SPLITS:
        part = raw[name]
        counts = [part.count(c) for c in range(part.num_classes)]
        empty = [part.names[c] for c, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(
                f"{part.where}: {len(empty)} {name} classes have no images (e.g. {', '.join(empty[:3])})"
            )
        want = split.images_per_class
        short = [n for n in counts if want is not None and n < want]
        if short:
            notes.append(f"{name}: {len(short)} classes have fewer than {want} images (fewest {min(short)})")
        if name in split.images and sum(counts) < split.images[name]:
            notes.append(f"{name}: {sum(counts)} images, the split file expects {split.images[name]}")


def build_benchmark(name: str, root: Path | str | None, split_file: str | Path | None = None, augment: bool = False,
                    rotations: bool = False, seed: int = 0, image_size: int | None = None,
                    **unknown: Any) -> FewShotDataset:
    """Read benchmark `name` from `root`; DataError (one line) when the files are missing or wrong.

    rotations: each class also turned by 90, 180 and 270 degrees, as new classes of its split.
    augment: random crop with padding and horizontal flip on the train split (not for Omniglot),
    seeded by `seed`. image_size: side of the model input (default: the dataset's convention).
    """
    if name not in BENCHMARKS:
        raise UsageError(f"unknown on-disk dataset {name!r}: expected one of {', '.join(BENCHMARKS)}")
    if unknown:
        raise UsageError(
            f"unknown option(s) for dataset {name}: {', '.join(sorted(unknown))} (accepted: {', '.join(OPTIONS)})"
        )
    if root is None:
        raise UsageError(f"dataset {name!r} is read from files you have: pass --data-root PATH")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UsageError(f"image_size must be a positive integer, got {image_size!r}")
    bench, root = BENCHMARKS[name], Path(root)
    split = load_split(name, split_file)
    layout, folder = detect(name, bench.layouts, root)
    request = Request(split, image_size=image_size)
    raw = layout.read(folder, request)
    _check_counts(raw, split, request.notes)
    if rotations:
        raw = {s: RotatedClasses(part) for s, part in raw.items()}
    size = image_size or bench.size
    splits = {
        s: PreparedImages(raw[s], Preprocess(size, bench.mean, bench.std, augment and s == "train" and bench.padding > 0,
                                             bench.padding * size // bench.size, seed))
        for s in SPLITS
    }
    info = {
        "format": layout.name, "root": str(root), "folder": str(folder), "split_file": split.source,
        "input_shape": (bench.channels, size, size), "normalised": bench.mean is not None,
        "augment": augment, "rotations": rotations, "seed": seed, "notes": request.notes,
    }
    return FewShotDataset(name, splits=splits, kind="classification", info=info)


for _name in BENCHMARKS:
    register(_name)(partial(build_benchmark, _name))
