"""iMAML (Rajeswaran et al. 2019): implicit MAML, on the same implicit engine as mrml.

Every parameter adapts (inner "all") on the proximal inner loss g(y) = support loss +
(lam/2)||y - y0||^2 whose centre y0 -- the initialisation -- is learned. At the inner solution y*,
d y*/d y0 = lam (H + lam I)^{-1} with H the Hessian of the support loss, so the meta-gradient is
(I + H/lam)^{-1} d_y f(y*). This is exactly what mrml's Algorithm 1 gives for the centre when the
inner loss is proximal: CG solves (H + lam I) v = d_y f with Hessian-vector products, and the
surrogate's backward yields lam * v for y0. So iMAML is `MRML` with the proximal term forced on and
the whole network as inner part: one conjugate-gradient implementation (`mrml.implicit`).

Default lam = 2.0. Reasons: (1) it keeps I + H/lam well conditioned, so N = 20 CG steps solve it
and the inner problem stays strongly convex despite the network's negative curvature; (2) the
implicit gradient assumes y_K is near y*, and the proximal part of g contracts by (1 - alpha lam)
per inner step: (1 - 0.1 * 2)^20 ~ 0.012 with the default K = 20, alpha = 0.1 (lam = 1 would leave
0.12). It stays stable (alpha (L + lam) < 2) for the default alpha unless the support-loss curvature
L exceeds ~18. Larger lam means less adaptation away from the init; tune with `--l2`.
Test-time adaptation: the base one (`test_steps` at `test_lr` on the proximal inner loss).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import UsageError
from .base import AlgoConfig
from .mrml import MRML


class IMAML(MRML):
    """iMAML: every parameter adapts on the proximal inner loss support loss + (lam/2)||y - y0||^2
    with the init y0 learned; its meta-gradient, the implicit (I + H/lam)^{-1} d_y f at the inner
    solution, comes from mrml's surrogate (K gradient steps + CG). Default lam = 2.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import IMAML, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = IMAML(model, "classification", AlgoConfig(inner_steps=5, cg_steps=5))
        >>> learner.prox, learner.config.inner, learner.config.l2
        (True, 'all', 2.0)
        >>> opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-3)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), sorted(stats.extra)[:3]
        (1.12, ['cg_iterations', 'cg_residual', 'inner_capped'])
    """

    name = "imaml"
    has_projected_form = False
    learns_inner_init = True
    default_inner = "all"
    default_l2 = 2.0
    default_learn_l2 = False

    def __init__(self, model: Any, loss: Any = "classification", config: AlgoConfig | None = None, **kwargs: Any):
        config = replace(config or AlgoConfig(), prox=True)
        if config.l2 is not None and config.l2 <= 0:
            raise UsageError(f"imaml needs a proximal strength --l2 > 0 (got {config.l2})")
        super().__init__(model, loss, config, **kwargs)
