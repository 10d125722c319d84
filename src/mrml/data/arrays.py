"""Your own labelled images or feature vectors as a few-shot dataset (`from_arrays`), and any dataset
fitted to a model's input.

One scaling rule: uint8 values are divided by 255 (the embedded glyphs pipeline, `base.to_tensor`, so
a model trained on glyphs sees inputs on its scale); float values are used as given -- [0, 1] pixels,
standardised (e.g. ImageNet-normalised) images with negative values or values above 1, precomputed
embeddings -- never rescaled or mean/std-normalised. Resizing is bilinear with antialiasing, as the
on-disk benchmarks resize; feature vectors (n, d) are neither resized nor given channels.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch

from ..errors import UsageError
from .base import SPLITS, ArrayClassImages, ClassImages, FewShotDataset, resize

#: the fewest images a class may have: one support and one query image
MIN_PER_CLASS = 2


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """float (n, C, H, W) with C in {1, 3} -> `channels` channels: grey repeated, or RGB averaged."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise UsageError(f"cannot convert {c}-channel images to {channels} channels: only 1 <-> 3 is supported")


SHAPES = "(n, d) feature vectors, or (n, H, W) or (n, C, H, W) images"


def _images_array(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        try:
            images = np.asarray(images)
        except (ValueError, TypeError):
            raise UsageError(f"images must be a numpy array or torch tensor shaped {SHAPES}") from None
    return images


def _label_key(value: Any, what: str) -> int | str:
    """A label as a plain int or str; anything else (floats, bools, None) is refused."""
    if isinstance(value, (bool, np.bool_)):
        raise UsageError(f"{what} must be ints or strings (got the bool {value!r})")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise UsageError(f"{what} must be ints or strings (got {type(value).__name__} {value!r})")


def _labels_list(labels: Any) -> list[int | str]:
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise UsageError(f"labels must be ints or strings (got a {labels.dtype} tensor)")
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if arr.ndim != 1:
        raise UsageError(f"labels must be one-dimensional, one label per image (got shape {tuple(arr.shape)})")
    if arr.dtype.kind in "fcb":
        raise UsageError(f"labels must be ints or strings (got {arr.dtype} labels): cast them with labels.astype(int)")
    keys = [_label_key(v, "labels") for v in arr.tolist()]
    if len({type(k) for k in keys}) > 1:
        raise UsageError("labels mix ints and strings: use one kind")
    return keys


def _check_values(images: np.ndarray, vectors: bool) -> None:
    """uint8 (divided by 255) or finite floats (used as given); float images holding only whole numbers
    up to 255 (0..255 pixels cast to float, most likely) are named in a warning: they are not divided."""
    if images.dtype == np.uint8:
        return
    if images.dtype.kind != "f":
        raise UsageError(f"images must be uint8 (0..255, divided by 255) or float (used as given), got {images.dtype}: "
                         f"e.g. images.astype(np.uint8) for 0..255 pixels, images.astype(np.float32) otherwise")
    if not np.isfinite(images).all():
        raise UsageError("images hold NaN or infinite values: float inputs must be finite")
    if not vectors and images.size and float(images.max()) > 1 and float(images.min()) >= 0 \
            and float(images.max()) <= 255 and bool((images == np.round(images)).all()):
        warnings.warn("float images hold whole numbers up to 255 and are used as given (not divided by 255): pass "
                      "uint8 to have them scaled to [0, 1]", stacklevel=3)


def _as_nchw(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        c = images.shape[1]
        if c not in (1, 3):
            hint = (": they look channels-last, pass images.transpose(0, 3, 1, 2)" if images.shape[3] in (1, 3, 4)
                    else "")
            raise UsageError(f"images shaped (n, C, H, W) must have C = 1 or 3 channels (got shape "
                             f"{tuple(images.shape)}){hint}")
        return images
    raise UsageError(f"images must be shaped {SHAPES} (got {images.ndim} dimensions, shape {tuple(images.shape)})")


def _fraction_split(classes: list, fractions: Sequence[Any], seed: int) -> dict[str, list]:
    if len(fractions) != 3:
        raise UsageError(f"split fractions must be three numbers (train, validation, test), got {tuple(fractions)!r}")
    try:
        f = np.array([float(v) for v in fractions])
    except (TypeError, ValueError):
        raise UsageError(f"split fractions must be numbers, got {tuple(fractions)!r}") from None
    if not np.isfinite(f).all() or (f < 0).any() or abs(f.sum() - 1) > 1e-6:
        raise UsageError(f"split fractions must be >= 0 and sum to 1, got {tuple(fractions)!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0 (got {seed!r})")
    k = len(classes)
    counts = np.floor(f * k).astype(int)
    remainders = f * k - counts
    for i in np.argsort(-remainders, kind="stable")[: k - counts.sum()]:  # largest remainders first
        counts[i] += 1
    for name, frac, n in zip(SPLITS, f, counts):
        if frac > 0 and n == 0:
            raise UsageError(f"split fractions {tuple(fractions)!r} of {k} classes leave the {name} split empty: "
                             f"give it a fraction of 0, or more classes")
    order = np.random.default_rng(seed).permutation(k)
    out, start = {}, 0
    for name, n in zip(SPLITS, counts):
        if n:
            out[name] = sorted(classes[i] for i in order[start:start + n])
        start += n
    return out


def _named_split(present: set, splits: Mapping[str, Any]) -> dict[str, list]:
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise UsageError(f"unknown split {unknown[0]!r} in splits: expected keys among {', '.join(SPLITS)}")
    out, seen = {}, {}
    for name, members in splits.items():
        if isinstance(members, (str, bytes)) or not hasattr(members, "__iter__"):
            raise UsageError(f"splits[{name!r}] must be a list of labels (got {type(members).__name__})")
        keys = [_label_key(v, f"splits[{name!r}]") for v in members]
        if not keys:
            raise UsageError(f"splits[{name!r}] is empty: name its classes or leave the split out")
        for key in keys:
            if key not in present:
                raise UsageError(f"splits[{name!r}] names label {key!r}, which no image has")
            if key in seen:
                where = "twice" if seen[key] == name else f"in both {seen[key]!r} and {name!r}"
                raise UsageError(f"label {key!r} is {where}: splits must be disjoint")
            seen[key] = name
        out[name] = keys
    return out


@dataclass
class ArrayDataset(FewShotDataset):
    """A `FewShotDataset` whose input shape is recorded in `info` (made by `from_arrays` or `conform`);
    a split may be empty (one `from_arrays` was not given)."""

    def __post_init__(self) -> None:
        self.shape = tuple(self.info["input_shape"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def check_episode(self, split: str, ways: int, shots: int, query: int) -> None:
        if split in self.splits and self.splits[split].num_classes == 0:
            given = ", ".join(s for s in SPLITS if self.splits[s].num_classes) or "none"
            raise UsageError(f"the {split} split of {self.name} has no classes (splits given: {given}): "
                             f"assign it some with from_arrays(splits=...)")
        super().check_episode(split, ways, shots, query)


def _class_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch))


def from_arrays(images: Any, labels: Any, splits: str | Mapping[str, Sequence[Any]] | Sequence[float],
                image_size: int | None = None, channels: int | None = None, name: str = "arrays",
                seed: int = 0) -> FewShotDataset:
    """A few-shot dataset from labelled arrays: episodes by `dataset.episode(split, ways, shots, query, rng)`.

    Values: uint8 -> divided by 255 (as the glyphs pipeline scales them); float -> used as given, any
    finite values ([0, 1] pixels, standardised images such as ImageNet-normalised ones, embeddings),
    never rescaled or normalised. (Float images holding only whole numbers up to 255 get a warning.) A
    model trained on glyphs saw bright strokes on a dark background: invert dark-on-light images
    (`255 - images`) first.

    Args:
        images: numpy array or torch tensor, uint8 or float: (n, d) feature vectors (a tabular or
            precomputed-embedding dataset: episodes of (d,) vectors, no resizing, no channels), or
            images shaped (n, H, W) or (n, C, H, W) with C = 1 or 3.
        labels: (n,) ints or strings, one per image; each distinct label is a class.
        splits: which classes go where: a dict `{"train": [labels], "validation": [...], "test": [...]}`
            (any of the three; disjoint; labels must occur); three fractions such as (0.6, 0.2, 0.2)
            dealt to a seeded shuffle of the classes; or one split name ("test") for all classes.
        image_size: resize to `image_size` x `image_size` (bilinear, antialiased); None keeps the size.
            Images only.
        channels: 1 or 3 to convert (grey repeated, RGB averaged); None keeps the channels. Images only.
        name: the dataset's name in messages.
        seed: seed of the class shuffle when `splits` are fractions.

    Returns:
        A `FewShotDataset` of float32 (C, H, W) images or (d,) vectors; splits not given are empty.

    Raises:
        UsageError: one line saying what was expected, for any misuse.

    Example:
        >>> import numpy as np
        >>> from mrml.data import episode_rng, from_arrays
        >>> rng = np.random.default_rng(0)
        >>> images = rng.integers(0, 256, size=(40, 32, 32), dtype=np.uint8)
        >>> ds = from_arrays(images, np.repeat(np.arange(8), 5), splits=(0.5, 0.25, 0.25), image_size=28)
        >>> [ds.splits[s].num_classes for s in ("train", "validation", "test")], ds.input_shape
        ([4, 2, 2], (1, 28, 28))
        >>> ep = ds.episode("train", 3, 1, 2, episode_rng(0, "train", 0))
        >>> tuple(ep.support_x.shape), tuple(ep.query_x.shape), ep.query_y.tolist()
        ((3, 1, 28, 28), (6, 1, 28, 28), [0, 0, 1, 1, 2, 2])
        >>> emb = rng.standard_normal((40, 64)).astype(np.float32)  # precomputed embeddings: used as given
        >>> vecs = from_arrays(emb, np.repeat(np.arange(8), 5), splits="test")
        >>> vecs.input_shape, tuple(vecs.episode("test", 5, 1, 1, episode_rng(0, "test", 0)).support_x.shape)
        ((64,), (5, 64))
    """
    arr = _images_array(images)
    keys = _labels_list(labels)
    if arr.ndim == 0 or arr.shape[0] != len(keys):
        n = arr.shape[0] if arr.ndim else "no"
        raise UsageError(f"images and labels must have one label per image (got {n} images, {len(keys)} labels)")
    if not keys:
        raise UsageError("images is empty: pass at least one class of at least 2 images")
    vectors = arr.ndim == 2
    if vectors:
        if arr.shape[1] < 1:
            raise UsageError(f"feature vectors must have at least 1 feature (got shape {tuple(arr.shape)})")
        if image_size is not None or channels is not None:
            raise UsageError("image_size and channels apply to images: feature vectors (n, d) are used as given, "
                             "drop them")
    else:
        arr = _as_nchw(arr)
        if min(arr.shape[2:]) < 1:
            raise UsageError(f"images must be at least 1x1 pixels (got shape {tuple(arr.shape)})")
    _check_values(arr, vectors)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or not 1 <= image_size <= 1024):
        raise UsageError(f"image_size must be an integer in 1..1024 (got {image_size!r})")
    if channels is not None and channels not in (1, 3) or isinstance(channels, bool):
        raise UsageError(f"channels must be 1 or 3 (got {channels!r}), or None to keep the images' own")
    if not isinstance(name, str) or not name:
        raise UsageError(f"name must be a non-empty string (got {name!r})")

    grouped: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        grouped.setdefault(key, []).append(i)
    classes = sorted(grouped)
    rows = {k: np.array(grouped[k]) for k in classes}
    if isinstance(splits, str):
        if splits not in SPLITS:
            raise UsageError(f"unknown split {splits!r}: expected one of {', '.join(SPLITS)}, a dict of them, "
                             f"or three fractions")
        assignment = {splits: classes}
    elif isinstance(splits, Mapping):
        assignment = _named_split(set(classes), splits)
    elif isinstance(splits, (tuple, list, np.ndarray)):
        assignment = _fraction_split(classes, list(splits), seed)
    else:
        raise UsageError(f"splits must be a split name, a dict of label lists, or three fractions "
                         f"(got {type(splits).__name__})")
    for members in assignment.values():
        for key in members:
            if len(rows[key]) < MIN_PER_CLASS:
                raise UsageError(f"class {key!r} has {len(rows[key])} image: every class needs at least "
                                 f"{MIN_PER_CLASS} (one support and one query image)")

    size = (int(image_size),) * 2 if image_size is not None else tuple(arr.shape[2:])
    out_channels = channels or arr.shape[1]
    shape = (arr.shape[1],) if vectors else (out_channels, *size)

    def prepare(idx: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(arr[idx]))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # as base.to_tensor scales
        if vectors:
            return x.contiguous().numpy()
        return convert_channels(resize(x, size), out_channels).contiguous().numpy()

    parts: dict[str, ClassImages] = {}
    for split in SPLITS:
        members = assignment.get(split, [])
        parts[split] = ArrayClassImages([str(k) for k in members], [prepare(rows[k]) for k in members], _class_tensor)
    info = {"input_shape": shape, "classes": {s: parts[s].num_classes for s in SPLITS},
            "images": int(sum(len(rows[k]) for m in assignment.values() for k in m)), "source_shape": tuple(arr.shape[1:]),
            "source_dtype": str(arr.dtype), "normalised": False,
            "scaling": "divided by 255" if arr.dtype == np.uint8 else "as given", "vectors": vectors}
    return ArrayDataset(name, splits=parts, kind="classification", info=info)


class ConformedImages(ClassImages):
    """A split's images resized to `size` and converted to `channels` channels when they differ."""

    def __init__(self, inner: ClassImages, channels: int, size: tuple[int, int]):
        self.inner, self.channels, self.size = inner, channels, size
        self.names = inner.names

    def count(self, cls: int) -> int:
        return self.inner.count(cls)

    def images(self, cls: int, idx: np.ndarray) -> torch.Tensor:
        x = self.inner.images(cls, idx)
        return convert_channels(resize(x, self.size), self.channels).contiguous()


def conform(dataset: Any, input_shape: Sequence[int]) -> Any:
    """`dataset` with its images served at `input_shape` (C, H, W): resized, channels converted 1 <-> 3.

    A dataset already of that shape, or not a `FewShotDataset` of images (a generated regression
    family), is returned as is; other channel counts, and feature vectors (d,) of another size than the
    model's, are a one-line UsageError.

    Example:
        >>> import numpy as np
        >>> from mrml.data import conform, from_arrays
        >>> rgb = np.zeros((4, 3, 32, 32), dtype=np.uint8)
        >>> conform(from_arrays(rgb, [0, 0, 1, 1], splits="test"), (1, 28, 28)).input_shape
        (1, 28, 28)
    """
    if not isinstance(dataset, FewShotDataset):
        return dataset
    have = tuple(dataset.input_shape)
    if len(have) == 1 and have != tuple(int(v) for v in input_shape):  # feature vectors: nothing to convert
        raise UsageError(f"{dataset.name} holds feature vectors of shape {have}, the model takes {tuple(input_shape)}: "
                         "vectors are not resized; give vectors of the model's input size")
    if len(input_shape) != 3:
        return dataset
    c, h, w = (int(v) for v in input_shape)
    if have == (c, h, w):
        return dataset
    if len(have) != 3 or (have[0] != c and {have[0], c} != {1, 3}):
        raise UsageError(f"images of {dataset.name} are shaped {have}, the model takes {(c, h, w)}: only sizes and "
                         f"1 <-> 3 channels can be converted")
    parts = {s: ConformedImages(part, c, (h, w)) for s, part in dataset.splits.items()}
    info = {**dataset.info, "input_shape": (c, h, w)}
    return ArrayDataset(dataset.name, splits=parts, kind=dataset.kind, info=info)
