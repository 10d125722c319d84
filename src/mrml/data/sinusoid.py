"""Sinusoid regression tasks (Finn et al. 2017): y = A sin(x - phase), A in [0.1, 5], phase in [0, pi],
x uniform in [-5, 5]. Each task is a fresh (A, phase): the split only changes the seed stream."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UsageError
from .base import Episode
from .registry import register


class SinusoidTasks:
    kind = "regression"
    name = "sinusoid"
    input_shape = (1,)

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)):
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.info = {"amplitude": amplitude, "phase": phase, "x_range": x_range}

    def num_outputs(self, ways: int) -> int:
        return 1

    def check_episode(self, split: str, ways: int, shots: int, query: int) -> None:
        if ways != 1:
            raise UsageError(f"sinusoid tasks are regression with one output: use --ways 1 (got {ways})")
        if shots < 1 or query < 1:
            raise UsageError(f"shots and query must be >= 1 (got shots={shots}, query={query})")

    def episode(self, split: str, ways: int, shots: int, query: int, rng: np.random.Generator) -> Episode:
        amp = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = rng.uniform(*self.x_range, size=(shots + query, 1))
        y = amp * np.sin(x[:, 0] - phase)
        xt = torch.from_numpy(x).float()
        yt = torch.from_numpy(y).float()
        return Episode(xt[:shots], yt[:shots], xt[shots:], yt[shots:])


@register("sinusoid")
def build_sinusoid(root: object = None, **options: object) -> SinusoidTasks:
    if root is not None:
        raise UsageError(f"sinusoid tasks are generated, not read from files: drop --data-root (got {root})")
    unknown = set(options) - {"seed"}
    if unknown:
        raise UsageError(f"sinusoid tasks take no option {sorted(unknown)[0]!r}: drop --{sorted(unknown)[0].replace('_', '-')}")
    return SinusoidTasks()
