"""Stored uint8 images -> model inputs: float32 (n, C, H, W), resized, optionally augmented, normalised."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..base import ClassImages, resize, to_tensor
from .sources import RawClasses

# per-channel statistics of the training images, the usual constants of each family
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET84_MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
IMAGENET84_STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)


@dataclass
class Preprocess:
    """Resize to `size`, then (training only) random crop with zero `padding` and horizontal flip, then normalise.

    Augmentation draws from `numpy.random.default_rng([seed, call])`, `call` counting the batches this
    object has seen, so a run with the same seed and the same requests sees the same crops and flips.
    Training sets `calls` to the episode's position before drawing it (`train.seek_augmentation`), so
    the crops of an episode do not depend on the rank or on where a resumed run started.
    """

    size: int
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    augment: bool = False
    padding: int = 0
    seed: int = 0
    calls: int = 0

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = to_tensor(batch)
        x = resize(x, (self.size, self.size))
        if self.augment:
            x = self._augment(x)
        if self.mean is not None:
            x = (x - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        return x.contiguous()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        p, n = self.padding, x.shape[0]
        padded = F.pad(x, (p, p, p, p))
        tops, lefts = rng.integers(0, 2 * p + 1, size=(2, n))
        flips = torch.from_numpy(rng.random(n) < 0.5)
        out = torch.stack([padded[i, :, t:t + self.size, s:s + self.size] for i, (t, s) in enumerate(zip(tops, lefts))])
        out[flips] = out[flips].flip(-1)
        return out


class PreparedImages(ClassImages):
    """A split's stored images served as model inputs; nothing is decoded before it is asked for."""

    def __init__(self, raw: RawClasses, preprocess: Preprocess):
        self.raw, self.preprocess = raw, preprocess
        self.names = raw.names

    def count(self, cls: int) -> int:
        return self.raw.count(cls)

    def images(self, cls: int, idx: np.ndarray) -> torch.Tensor:
        return self.preprocess(self.raw.raw(cls, np.asarray(idx)))
