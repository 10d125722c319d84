"""What every task source offers: seeded episodes drawn from class-disjoint splits.

A *task source* is either a labelled image set (`FewShotDataset`: classes grouped per split, an
N-way K-shot episode draws N classes then K support and Q query images of each) or a generated
family such as sinusoid regression. Both expose `episode(split, ways, shots, query, rng)`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import pytree
from ..errors import UsageError

SPLITS = ("train", "validation", "test")
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}


@dataclass
class Episode:
    """One task: support set (fits the inner variable) and query set (judges it).

    Inputs `support_x`/`query_x` are what the model's forward takes: a tensor, or a dict/list/tuple
    tree of tensors (e.g. a text model's `{"input_ids": ..., "attention_mask": ...}`; see
    `mrml.pytree`), examples along dim 0. Targets `support_y`/`query_y` are tensors: class indices
    for classification, values for regression, whatever a custom loss takes.

    Args:
        support_x: support inputs (fit the inner variable), examples along dim 0.
        support_y: support targets, one per support example.
        query_x: query inputs (the outer loss is measured on them).
        query_y: query targets, one per query example.

    Example:
        >>> import torch
        >>> ids = torch.zeros(4, 7, dtype=torch.long)
        >>> ep = Episode({"input_ids": ids, "attention_mask": torch.ones(4, 7)}, torch.arange(4),
        ...              {"input_ids": ids, "attention_mask": torch.ones(4, 7)}, torch.arange(4))
        >>> moved = ep.to("cpu", torch.float64)
        >>> moved.support_x["attention_mask"].dtype, moved.support_x["input_ids"].dtype
        (torch.float64, torch.int64)
    """

    support_x: Any
    support_y: torch.Tensor
    query_x: Any
    query_y: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Episode":
        """Every tensor moved to `device`; floating-point ones (inputs and targets) also cast to `dtype`."""
        return Episode(*(pytree.to(t, device, dtype) for t in (self.support_x, self.support_y, self.query_x,
                                                              self.query_y)))


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for episode `index` of `split`: the same (seed, split, index), the same episode."""
    return np.random.default_rng([int(seed), _SPLIT_ID[split], int(index)])


class ClassImages(abc.ABC):
    """One split of an image dataset: images grouped by class, returned preprocessed as float tensors."""

    names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def count(self, cls: int) -> int:
        """Number of images of class `cls`."""

    @abc.abstractmethod
    def images(self, cls: int, idx: np.ndarray) -> torch.Tensor:
        """Images `idx` of class `cls` as float32 (n, C, H, W), preprocessed (normalised)."""


Transform = Callable[[np.ndarray], torch.Tensor]


def to_tensor(batch: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 (n,H,W) or (n,H,W,C) -> float32 (n,C,H,W) in [0,1], optionally normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float()
    if batch.dtype == np.uint8:
        x = x / 255.0
    if mean is not None:
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float (n, C, H, W) -> (n, C, *size), bilinear with antialiasing (unchanged when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class ArrayClassImages(ClassImages):
    """Classes held as in-memory (or memory-mapped) uint8 arrays, one array per class."""

    def __init__(self, names: list[str], arrays: list[np.ndarray], transform: Transform = to_tensor):
        if len(names) != len(arrays):
            raise ValueError("one array per class name is expected")
        self.names = list(names)
        self.arrays = arrays
        self.transform = transform

    def count(self, cls: int) -> int:
        return int(self.arrays[cls].shape[0])

    def images(self, cls: int, idx: np.ndarray) -> torch.Tensor:
        return self.transform(np.asarray(self.arrays[cls][np.asarray(idx)]))


@dataclass
class FewShotDataset:
    """A labelled image set split into class-disjoint train/validation/test parts."""

    name: str
    splits: dict[str, ClassImages]
    kind: str = "classification"
    info: dict = field(default_factory=dict)
    _eligible: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def eligible(self, split: str, need: int) -> np.ndarray:
        """Classes of `split` with at least `need` images (computed once per split and size)."""
        key = (split, need)
        if key not in self._eligible:
            part = self.splits[split]
            self._eligible[key] = np.array([c for c in range(part.num_classes) if part.count(c) >= need], dtype=np.int64)
        return self._eligible[key]

    @property
    def input_shape(self) -> tuple[int, ...]:
        split = self.splits["train"]
        return tuple(split.images(0, np.array([0])).shape[1:])

    def num_outputs(self, ways: int) -> int:
        return ways

    def check_episode(self, split: str, ways: int, shots: int, query: int) -> None:
        """Raise a one-line UsageError when the episode shape is impossible for this split."""
        if split not in self.splits:
            raise UsageError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if ways < 1 or shots < 1 or query < 1:
            raise UsageError(f"ways, shots and query must be >= 1 (got ways={ways}, shots={shots}, query={query})")
        if ways < 2:
            raise UsageError("1-way classification has one answer, always right (100% accuracy, nothing learnt): "
                             "use --ways 2 or more")
        part = self.splits[split]
        if ways > part.num_classes:
            raise UsageError(
                f"{ways}-way episodes need {ways} classes but the {split} split of {self.name} has "
                f"{part.num_classes}: lower --ways"
            )
        need = shots + query
        if len(self.eligible(split, need)) < ways:
            raise UsageError(
                f"{shots} shots + {query} query = {need} images per class, but too few classes of the "
                f"{split} split of {self.name} have that many: lower --shots or --query"
            )

    def episode(self, split: str, ways: int, shots: int, query: int, rng: np.random.Generator) -> Episode:
        """Draw N classes, then K support and Q query images per class; labels are 0..N-1 in draw order."""
        part = self.splits[split]
        need = shots + query
        eligible = self.eligible(split, need)
        if len(eligible) < ways:
            self.check_episode(split, ways, shots, query)
        classes = rng.choice(eligible, size=ways, replace=False)
        sx, qx = [], []
        for c in classes:
            idx = rng.choice(part.count(int(c)), size=need, replace=False)
            imgs = part.images(int(c), idx)
            sx.append(imgs[:shots])
            qx.append(imgs[shots:])
        labels = torch.arange(ways)
        return Episode(
            torch.cat(sx), labels.repeat_interleave(shots), torch.cat(qx), labels.repeat_interleave(query)
        )
