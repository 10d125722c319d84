"""ITD-BiO (Ji, Yang & Liang 2021): bilevel meta-learning by iterative differentiation.

The inner problem is mrml's: the head y fits the support set on the l2-regularised loss
g = support loss + (lam/2)||y||^2 (ridge centre 0), from a fixed (not learned) head init; the
hypergradient is obtained by backpropagating the query loss through the K unrolled head steps
(`create_graph=True`) rather than implicitly. As K grows on a strongly convex g it converges to
mrml's implicit hypergradient; its memory grows linearly in K. Backbone features are computed once
per task, or re-run in every inner step with `config.recompute_features` (the paper-code form).

Defaults: inner "head", l2 = 1e-2 (mrml's). Test-time adaptation: the base one (`test_steps` at
`test_lr` on the regularised inner loss), identical to mrml's.
"""
from __future__ import annotations

from .base import MetaAlgorithm
from .maml import Unrolled


class ITDBiO(Unrolled):
    """ITD-BiO: K head steps on mrml's ridge-regularised inner loss, unrolled with graph from a fixed
    (not learned) head init; the query loss is differentiated through them (memory linear in K; it
    tends to mrml's implicit hypergradient as K grows). Test-time adaptation: mrml's.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import ITDBiO, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = ITDBiO(model, "classification", AlgoConfig(inner="2", inner_steps=5))
        >>> learner.config.l2, len(learner.outer_parameters())  # the head init is not learned
        (0.01, 2)
        >>> opt = torch.optim.SGD(learner.outer_parameters(), lr=0.1)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), model[2].weight.grad is None
        (1.12, True)
    """

    name = "itd-bio"
    learns_inner_init = False
    default_inner = "head"
    default_l2 = 1e-2
    adapted_inner = MetaAlgorithm.adapted_inner
