"""Omniglot character folders: `images_{background,evaluation}/<Alphabet>/characterNN/*.png` (105x105, 1-bit).

Strokes are black on white in the files; they are inverted (strokes = 1) and resized (28x28 by
default) while reading, and the decoded arrays are kept in memory only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..base import SPLITS
from .layouts import Layout, Request
from .sources import RawClasses, read_png_folders, require_classes, stacked

STORED = (105, 105)
SIZE = 28
BACKGROUND, EVALUATION = "images_background", "images_evaluation"


def _characters(base: Path) -> set[str]:
    return {f"{top}/{a.name}/{c.name}" for top in (BACKGROUND, EVALUATION) if (base / top).is_dir()
            for a in (base / top).iterdir() if a.is_dir() for c in a.iterdir() if c.is_dir()}


def read_omniglot(base: Path, req: Request) -> dict[str, RawClasses]:
    size = req.image_size or SIZE

    def convert(img: Image.Image) -> np.ndarray:
        return np.asarray(ImageOps.invert(img).resize((size, size), Image.LANCZOS))

    present = _characters(base)
    out = {}
    for split in SPLITS:
        wanted = req.split.classes[split]
        require_classes(present, wanted, split, str(base))
        arrays = read_png_folders([base / w for w in wanted], "L", STORED, f"reading omniglot {split}", convert, (size, size))
        out[split] = stacked(wanted, arrays, str(base), (size, size))
    return out


OMNIGLOT = Layout(
    "omniglot-folders", "[omniglot-py/]images_{background,evaluation}/<Alphabet>/characterNN/*.png",
    (BACKGROUND, EVALUATION), read_omniglot, folders=("", "omniglot-py", "omniglot"),
)
