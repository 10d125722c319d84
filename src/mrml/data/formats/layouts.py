"""Which on-disk format a data root holds, told from the files present."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import DataError
from .sources import RawClasses
from .splits import ClassSplit

_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass
class Request:
    """What a reader is asked for: the split's classes, a place for warnings, an optional image size."""

    split: ClassSplit
    notes: list[str] = field(default_factory=list)
    image_size: int | None = None


Reader = Callable[[Path, Request], "dict[str, RawClasses]"]


@dataclass(frozen=True)
class Layout:
    """One format: the paths it needs inside a folder, where that folder may sit, and its reader."""

    name: str
    pattern: str  # the layout as a user would recognise it, for messages
    files: tuple[str, ...]
    read: Reader
    folders: tuple[str, ...] = ("",)  # relative to the data root


def detect(dataset: str, layouts: tuple[Layout, ...], root: Path) -> tuple[Layout, Path]:
    """The first layout whose files are all present (and the folder holding them); DataError otherwise."""
    if not root.exists():
        raise DataError(f"data root {root} does not exist: pass the folder that holds the {dataset} files")
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder: pass the folder that holds the {dataset} files")
    partial: tuple[int, Layout, Path, list[str]] | None = None
    for layout in layouts:
        for sub in layout.folders:
            base = root / sub if sub else root
            missing = [f for f in layout.files if not (base / f).exists()]
            if not missing:
                return layout, base
            found = len(layout.files) - len(missing)
            if found and (partial is None or found > partial[0]):
                partial = (found, layout, base, missing)
    if partial is not None:
        _, layout, base, missing = partial
        raise DataError(
            f"{base} holds part of the {layout.name} layout ({layout.pattern}) but lacks {', '.join(missing)}"
        )
    for layout in layouts:
        for sub in layout.folders:
            # an archive named after a file of the layout, or after the layout's folder (cifar-100-python.tar.gz)
            tops = [root / sub / f.split("/")[0] for f in layout.files] + ([root / sub.split("/")[0]] if sub else [])
            for top in tops:
                for ext in _ARCHIVES:
                    archive = top.with_name(top.name + ext)
                    if archive.is_file():
                        raise DataError(f"{archive} is still packed: extract it inside {archive.parent} first "
                                        f"(e.g. tar xf {archive.name})")
    expected = "; ".join(f"{layout.pattern} ({layout.name})" for layout in layouts)
    raise DataError(f"no {dataset} files found in {root}: expected one of: {expected}")
