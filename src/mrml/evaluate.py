"""Meta-testing: mean accuracy over seeded episodes with a 95% confidence interval (1.96 std/sqrt(T))."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .algorithms.base import MetaAlgorithm
from .algorithms.finetune import AdaptSettings
from .data.base import episode_rng


def confidence95(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def episode_scores(algo: MetaAlgorithm, source: Any, split: str, ways: int, shots: int, query: int, seed: int,
                   indices: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32,
                   progress: bool = False, *, adapt: AdaptSettings | None = None,
                   chosen: list[bool] | None = None) -> tuple[list[float], list[float]]:
    """Losses and accuracies (empty for regression) of episodes `indices` of `split`, in that order.

    `adapt`: the test-time adaptation (`mrml.algorithms.finetune`; None: the algorithm's own). `chosen`,
    under adapt auto: appended per episode, whether last-block was chosen."""
    it: Any = indices
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"meta-test ({split})", leave=False, dynamic_ncols=True)
    losses, accs = [], []
    for i in it:
        ep = source.episode(split, ways, shots, query, episode_rng(seed, split, i)).to(device, dtype)
        stats = algo.evaluate(ep, **adapt.kwargs()) if adapt is not None else algo.evaluate(ep)
        if chosen is not None and "adapt_last_block" in stats.extra:
            chosen.append(stats.extra["adapt_last_block"] == 1.0)
        losses.append(stats.loss)
        if stats.accuracy is not None:
            accs.append(stats.accuracy)
    return losses, accs


def summarize(split: str, seed: int, losses: list[float], accs: list[float]) -> dict[str, Any]:
    """Means and 95% intervals of per-episode scores (accuracy None when there is none)."""
    out: dict[str, Any] = {"split": split, "episodes": len(losses), "seed": seed,
                           "loss": float(np.mean(losses)), "loss_ci95": confidence95(losses)}
    if accs:
        out.update(accuracy=float(np.mean(accs)), ci95=confidence95(accs))
    else:
        out.update(accuracy=None, ci95=None)
    return out


def meta_test(algo: MetaAlgorithm, source: Any, split: str, ways: int, shots: int, query: int, episodes: int,
              seed: int, device: torch.device, dtype: torch.dtype = torch.float32, progress: bool = False) -> dict[str, Any]:
    """Adapt to `episodes` seeded episodes of `split` and score the query sets.

    Episode i is drawn from `episode_rng(seed, split, i)`: the same seed gives the same episodes,
    whatever the model, so runs are compared on identical tasks.
    """
    losses, accs = episode_scores(algo, source, split, ways, shots, query, seed, range(episodes), device, dtype, progress)
    return summarize(split, seed, losses, accs)
