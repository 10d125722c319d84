"""Datasets by name: `build_dataset("glyphs")`, `build_dataset("cifar-fs", root=...)`.

Each family module registers a builder with `@register("name")`; builders take `root` (a folder the
user already has, or None for embedded data) plus keyword options, and return a task source with
`episode(split, ways, shots, query, rng)`, `check_episode(...)`, `kind` and `input_shape`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

Builder = Callable[..., Any]
_BUILDERS: dict[str, Builder] = {}

# name -> module that registers it (imported on first use, so `mrml --help` stays fast)
_MODULES = {
    "glyphs": "mrml.data.glyphs",
    "glyphs-negative": "mrml.data.glyphs",
    "sinusoid": "mrml.data.sinusoid",
    "cifar-fs": "mrml.data.benchmarks",
    "fc100": "mrml.data.benchmarks",
    "mini-imagenet": "mrml.data.benchmarks",
    "tiered-imagenet": "mrml.data.benchmarks",
    "omniglot": "mrml.data.benchmarks",
}

# datasets that are files the user has on disk (need --data-root)
ON_DISK = ("cifar-fs", "fc100", "mini-imagenet", "tiered-imagenet", "omniglot")


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    return sorted(set(_MODULES) | set(_BUILDERS))


def build_dataset(name: str, root: str | Path | None = None, **options: Any) -> Any:
    """Build the task source `name` (embedded, generated, or read from the user's files under `root`).

    Args:
        name: one of `dataset_names()`: glyphs, sinusoid, cifar-fs, fc100, mini-imagenet,
            tiered-imagenet, omniglot, or one added with `register`.
        root: folder holding the files of an on-disk benchmark (see DATA_FORMATS.md); glyphs: its cache.
        **options: builder options, e.g. `image_size`, `split_file`, `rotations`, `augment`, `seed`.

    Returns:
        A task source with `episode(split, ways, shots, query, rng)`, `check_episode(...)`, `kind`
        and `input_shape` (image datasets: a `FewShotDataset`).

    Raises:
        UsageError: one line for an unknown name, a missing root or a bad option (DataError for bad files).

    Example:
        >>> from mrml.data import build_dataset, episode_rng
        >>> tasks = build_dataset("sinusoid")
        >>> ep = tasks.episode("test", 1, 5, 10, episode_rng(0, "test", 0))
        >>> tasks.kind, tuple(ep.support_x.shape), tuple(ep.query_y.shape)
        ('regression', (5, 1), (10,))
        >>> build_dataset("mnist")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mrml.errors.UsageError: unknown dataset 'mnist': expected one of ...
    """
    if name not in _MODULES and name not in _BUILDERS:
        raise UsageError(f"unknown dataset {name!r}: expected one of {', '.join(dataset_names())}")
    if name in ON_DISK and root is None:
        raise UsageError(f"dataset {name!r} is read from files you have: pass --data-root PATH (see DATA_FORMATS)")
    if name not in _BUILDERS:
        importlib.import_module(_MODULES[name])
    return _BUILDERS[name](root=None if root is None else Path(root), **options)
