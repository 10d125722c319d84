"""Images as stored on disk, grouped by class: uint8 (n, H, W, C) or (n, H, W), before any preprocessing.

Every format reader turns its files into one `RawClasses` per split, with class names in the split
file's order. Arrays stay as loaded (or memory-mapped) and are indexed per request; PNG bytes are
decoded only for the images an episode asks for.
"""
from __future__ import annotations

import abc
import io
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ...errors import DataError
from ..safe_pickle import require_regular_file


class RawClasses(abc.ABC):
    """One split's stored images by class; `where` names the files they come from (for messages)."""

    names: list[str]
    where: str

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def count(self, cls: int) -> int:
        """Number of images of class `cls`."""

    @abc.abstractmethod
    def raw(self, cls: int, idx: np.ndarray) -> np.ndarray:
        """Images `idx` of class `cls` as stored: uint8 (n, H, W[, C])."""


class IndexedClasses(RawClasses):
    """Rows of one (possibly memory-mapped) uint8 array; `rows[c]` lists class c's rows.

    `reverse_channels` turns BGR storage into RGB on access.
    """

    def __init__(self, names: list[str], data: np.ndarray, rows: list[np.ndarray], where: str,
                 reverse_channels: bool = False):
        self.names, self.data, self.rows, self.where = list(names), data, rows, where
        self.reverse_channels = reverse_channels

    def count(self, cls: int) -> int:
        return len(self.rows[cls])

    def raw(self, cls: int, idx: np.ndarray) -> np.ndarray:
        batch = np.asarray(self.data[self.rows[cls][np.asarray(idx)]])
        return batch[..., ::-1] if self.reverse_channels else batch


def stacked(names: list[str], arrays: list[np.ndarray], where: str, shape: tuple[int, ...]) -> IndexedClasses:
    """`IndexedClasses` over per-class arrays (folders of PNGs decoded into memory)."""
    sizes = [len(a) for a in arrays]
    data = np.concatenate(arrays) if sum(sizes) else np.zeros((0, *shape), np.uint8)
    starts = np.cumsum([0, *sizes])
    return IndexedClasses(names, data, [np.arange(s, s + n) for s, n in zip(starts, sizes)], where)


MAX_PIXELS = 4096 * 4096  # benchmark images are at most a few hundred pixels a side; more is a decompression bomb


def open_image(source: object, where: str, decode: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open `source` (a path or a file object), check its declared size, then `decode` it.

    Any failure (unknown format, truncated data, a decompression bomb, a decoder error) is a one-line
    DataError naming `where`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:  # type: ignore[arg-type]
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DataError(f"{where} declares {w}x{h} pixels, far more than a benchmark image "
                                    "(a decompression bomb?): remove or replace it")
                return decode(img)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{where} is not a readable image (no image format recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{where} is a decompression bomb (far more pixels than its file size suggests): remove it") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors on hostile files
        raise DataError(f"{where} is not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


def decode_png(blob: np.ndarray | bytes, where: str) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 RGB array (H, W, 3)."""
    try:
        data = bytes(blob)
    except (TypeError, ValueError):
        raise DataError(f"{where} is not image bytes (a {type(blob).__name__})") from None
    return open_image(io.BytesIO(data), where, lambda img: np.asarray(img.convert("RGB")))


class PngBytesClasses(RawClasses):
    """Encoded images (a list of uint8 byte arrays) decoded one by one when requested, never all at once."""

    def __init__(self, names: list[str], blobs: list, rows: list[np.ndarray], where: str, shape: tuple[int, ...]):
        self.names, self.blobs, self.rows, self.where, self.shape = list(names), blobs, rows, where, shape

    def count(self, cls: int) -> int:
        return len(self.rows[cls])

    def raw(self, cls: int, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape), np.uint8)
        for j, i in enumerate(self.rows[cls][np.asarray(idx)]):
            img = decode_png(self.blobs[int(i)], f"image {int(i)} of {self.where}")
            if img.shape != self.shape:
                raise DataError(f"image {int(i)} of {self.where} has shape {img.shape}, expected {self.shape}")
            out[j] = img
        return out


class RotatedClasses(RawClasses):
    """Each class of `base` four times, turned by 0, 90, 180 and 270 degrees: new classes."""

    def __init__(self, base: RawClasses):
        self.base, self.where = base, base.where
        self.names = [f"{n}/rot{k * 90}" for n in base.names for k in range(4)]

    def count(self, cls: int) -> int:
        return self.base.count(cls // 4)

    def raw(self, cls: int, idx: np.ndarray) -> np.ndarray:
        return np.rot90(self.base.raw(cls // 4, idx), k=cls % 4, axes=(1, 2))


def check_array(data: np.ndarray, shape: tuple[int, ...], where: str) -> None:
    """DataError unless `data` is uint8 images of `shape` (one row per image)."""
    if not isinstance(data, np.ndarray) or data.ndim != len(shape) + 1 or tuple(data.shape[1:]) != shape:
        got = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{where}: images have shape {got}, expected (N, {', '.join(map(str, shape))}) uint8")
    if data.dtype != np.uint8:
        raise DataError(f"{where}: images have dtype {data.dtype}, expected uint8")


def rows_by_label(labels: Iterable[int], n_images: int, where: str) -> dict[int, np.ndarray]:
    """Label -> row indices (ascending), after checking there is one integer label per image."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_images or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected {n_images} integer labels, one per image, got {labels.dtype} {labels.shape}")
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): rows for v, rows in zip(values, np.split(order, starts[1:]))}


def name_labels(labels: Iterable[int], wanted: list[str], split: str, where: str, notes: list[str],
                names: Mapping[int, str] | None = None, strict: bool = True) -> dict[int, str]:
    """Class names for a file's integer labels.

    `names` (label -> class name) are used when given; with `strict=False` they are only a guess
    (e.g. CIFAR-100 fine-label indices) and are dropped when they do not cover the split. Without
    names, the file's split membership is trusted: its sorted labels are matched to the split's
    classes in order, which needs the class counts to agree.
    """
    labels = sorted(int(v) for v in labels)
    missing: list[str] = []
    if names is not None:
        named = {v: names[v] for v in labels if v in names}
        if strict or set(wanted) <= set(named.values()):
            return named
        missing = [w for w in wanted if w not in set(named.values())]
    if len(labels) != len(wanted):
        detail = f"(e.g. {', '.join(missing[:3])} are not among them)" if missing else "(its labels carry no class names)"
        raise DataError(
            f"{where} holds {len(labels)} classes but the {split} split lists {len(wanted)} {detail}: "
            "check the files or pass the matching split file"
        )
    notes.append(f"{where}: labels carry no class names; matched to the {split} classes in label order")
    return dict(zip(labels, wanted))


def named_rows(rows: Mapping[int, np.ndarray], names: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Label -> rows turned into class name -> rows (labels without a name are dropped)."""
    return {names[v]: r for v, r in rows.items() if v in names}


def entry(doc: object, key: str, where: str) -> object:
    """`doc[key]` of an unpickled dict whose keys may be str or bytes; DataError when absent."""
    if isinstance(doc, dict):
        for k in (key, key.encode("latin1")):
            if k in doc:
                return doc[k]
        keys = ", ".join(sorted(text(k) for k in doc))
        raise DataError(f"{where} has no {key!r} entry (it has: {keys[:200]})")
    raise DataError(f"{where} holds a {type(doc).__name__}, expected a dict with a {key!r} entry")


def text(value: object) -> str:
    """A name read from a pickle (str, or bytes from Python 2) as str."""
    return value.decode("latin1") if isinstance(value, (bytes, bytearray)) else str(value)


def require_classes(available: Iterable[str], wanted: list[str], split: str, where: str) -> None:
    """DataError naming (a few of) the split's classes that `available` lacks."""
    have = set(available)
    missing = [w for w in wanted if w not in have]
    if missing:
        raise DataError(
            f"{where} lacks {len(missing)} of the {len(wanted)} {split} classes of the split "
            f"(e.g. {', '.join(missing[:3])}); it has {len(have)} classes: check the files or pass the matching split file"
        )


def select(rows: Mapping[str, np.ndarray], wanted: list[str], split: str, where: str,
           notes: list[str] | None = None) -> list[np.ndarray]:
    """Rows of each wanted class, in `wanted` order; DataError naming the classes the files lack.

    With `notes`, classes of the files that the split does not list are reported there.
    """
    require_classes(rows, wanted, split, where)
    extra = len(set(rows) - set(wanted))
    if extra and notes is not None:
        notes.append(f"{where}: {extra} classes not in the {split} split are ignored")
    return [np.asarray(rows[w]) for w in wanted]


def read_png_folders(folders: list[Path], mode: str, shape: tuple[int, ...], desc: str,
                     convert: Callable[[Image.Image], np.ndarray] | None = None,
                     out_shape: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Decode every `*.png` of each folder (sorted by name): one uint8 array per folder.

    Each image is checked against `shape` (as stored, in PIL `mode`), then passed through `convert`,
    which returns images of `out_shape` (default `shape`).
    """
    out = []
    for folder in tqdm(folders, desc=desc, unit="class", leave=False):
        images = []
        for path in sorted(folder.glob("*.png")):
            def decode(img: Image.Image, path: Path = path) -> np.ndarray:
                img = img.convert(mode)
                if np.asarray(img).shape != shape:
                    raise DataError(f"{path}: image has shape {np.asarray(img).shape}, expected {shape}")
                return convert(img) if convert else np.asarray(img)

            require_regular_file(path)  # a FIFO named *.png would block the open
            images.append(open_image(path, str(path), decode))
        out.append(np.stack(images) if images else np.zeros((0, *(out_shape or shape)), np.uint8))
    return out
