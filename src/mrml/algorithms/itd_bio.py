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
    """Iterative differentiation of the regularised bilevel problem; head init fixed."""

    name = "itd-bio"
    learns_inner_init = False
    default_inner = "head"
    default_l2 = 1e-2
    adapted_inner = MetaAlgorithm.adapted_inner
