"""Reptile (Nichol, Achiam & Schulman 2018): first-order meta-learning without a query gradient.

Per task, K plain gradient steps (no graph) adapt every parameter (inner "all") on the task's data
-- by default the support and query sets together, as Reptile's inner loop trains on all the samples
of a task; `config.extra["reptile_query"] = False` uses the support set only. The meta-gradient is
init - adapted, averaged over the tasks: an outer SGD step of size eps moves the initialisation
eps of the way toward the mean adapted parameters (eps = 1: onto it). With an inner part narrower than
the whole network, only the inner parameters receive a meta-gradient (the rest get none and stay).

The reported loss and accuracy are those of the adapted parameters on the query set, which (by
default) the inner loop has trained on: training figures, not held-out ones.
Defaults: inner "all", no regulariser (l2 = 0), init learned. Test-time adaptation: the training
inner loop on the support set (`inner_steps` at `inner_lr`, as for MAML; see `maml.py`).
"""
from __future__ import annotations

from typing import Any

import torch

from .. import pytree
from ..data.base import Episode
from .base import StepStats, detached
from .maml import Unrolled


def _concat(a: Any, b: Any) -> Any:
    """Two trees of equal structure (tensors, or dicts/lists/tuples of them) concatenated along dim 0."""
    rest = iter(pytree.leaves(b))
    return pytree.tree_map(lambda t: torch.cat([t, next(rest)]), a)


class Reptile(Unrolled):
    """Reptile: K plain gradient steps (no graph) on the task's support and query sets; the
    meta-gradient is init - adapted, so an outer SGD step of size eps moves the init eps of the way
    toward the adapted parameters. Test-time adaptation: the training inner loop on the support set.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import Reptile, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = Reptile(model, "classification", AlgoConfig(inner_steps=3))
        >>> opt = torch.optim.SGD(learner.outer_parameters(), lr=1.0)  # eps = 1: onto the adapted init
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), stats.extra
        (1.07, {})
    """

    name = "reptile"
    learns_inner_init = True
    default_inner = "all"
    default_l2 = 0.0

    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        cfg, split = self.config, self.split
        use_query = bool(cfg.extra.get("reptile_query", True))
        with torch.no_grad():
            fs, fq = split.features(ep.support_x), split.features(ep.query_x)
        xa = detached(split.adapt_outer())
        feats, labels = (_concat(fs, fq), torch.cat([ep.support_y, ep.query_y])) if use_query else (fs, ep.support_y)
        init = split.inner_init()
        y = self.gradient_descent(xa, init, feats, labels, cfg.inner_steps, cfg.inner_lr, self.centre(False))
        with torch.no_grad():
            for k, p in init.items():
                step = scale * (p.detach() - y[k])
                p.grad = step if p.grad is None else p.grad + step
            pred = split.predict({**xa, **y}, fq)
            f = self.loss(pred, ep.query_y)
        return StepStats(float(f), self.loss.accuracy(pred, ep.query_y))
