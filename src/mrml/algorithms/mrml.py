"""Algorithm 1 of Yang, Ma & Yu (AAAI 2025): memory-reduced meta-learning.

Per task: the trunk runs once on support and query with gradient; K plain gradient steps fit the
inner part y on a detached copy of the support features (no graph across steps); conjugate
gradient solves (d2g/dy2) v = d_y f(x, y_K) with Hessian-vector products; then one backward pass of
the surrogate f(x, y_K) - <d_y g(x, y_K), v> (y_K and v constant) gives the hypergradient
d_x f - (d2g/dx dy) v. Nothing kept depends on K or N, so memory is constant in both.

With a proximal inner loss (inner part wider than the head), the centre y0 is an outer variable and
the same surrogate yields its gradient lam * v: this is iMAML's (I + H/lam)^{-1} d_y f.
"""
from __future__ import annotations

from typing import Any

import torch

from ..data.base import Episode
from ..implicit import CGInfo, conjugate_gradient
from ..models.split import Params
from .base import MetaAlgorithm, StepStats, detached, flat, unflat


class MRML(MetaAlgorithm):
    name = "mrml"
    has_batched_path = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._warm: dict[Any, tuple[Params, torch.Tensor]] = {}

    # -- task-batched path (mrml.algorithms.batched): chunks of `task_chunk` tasks, amp, compile --
    def meta_gradient(self, episodes: list[Episode], task_ids: list[Any] | None = None,
                      scale: float | None = None) -> StepStats:
        if self.config.batched:
            from .batched import batched_meta_gradient

            return batched_meta_gradient(self, episodes, task_ids, scale)
        return super().meta_gradient(episodes, task_ids, scale)
    # -- end of the task-batched hook -------------------------------------------------------------

    def solve(self, xa: Params, y: Params, fs: torch.Tensor, ys: torch.Tensor, rhs: torch.Tensor,
              centre: Params | None, v0: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
        """CG on (d2g/dy2) v = rhs at y, with x detached; the Hessian is never formed."""
        yr = detached(y, requires_grad=True)
        with torch.enable_grad():
            g = self.inner_loss(xa, yr, fs, ys, centre)
            grads = torch.autograd.grad(g, list(yr.values()), create_graph=True)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            parts = list(unflat(v, yr).values())
            hv = torch.autograd.grad(grads, list(yr.values()), grad_outputs=parts, retain_graph=True)
            return flat(hv).detach()

        return conjugate_gradient(hvp, rhs, self.config.cg_steps, self.config.cg_tol, x0=v0)

    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        cfg, split = self.config, self.split
        fs, fq = split.features(ep.support_x), split.features(ep.query_x)  # with gradient, once
        xa = split.adapt_outer()
        xa_d, fs_d, fq_d = detached(xa), fs.detach(), fq.detach()
        warm = self._warm.get(task_id) if (cfg.warm_start and task_id is not None) else None
        y0 = warm[0] if warm is not None else split.inner_init()
        y = self.gradient_descent(xa_d, y0, fs_d, ep.support_y, cfg.inner_steps, cfg.inner_lr, self.centre(False))

        # right-hand side d_y f(x, y_K), then v by CG
        yr = detached(y, requires_grad=True)
        with torch.enable_grad():
            fy = self.loss(split.predict({**xa_d, **yr}, fq_d), ep.query_y)
            rhs = flat(torch.autograd.grad(fy, list(yr.values()))).detach()
        v, info = self.solve(xa_d, y, fs_d, ep.support_y, rhs, self.centre(False), warm[1] if warm else None)
        if cfg.warm_start and task_id is not None:
            self._warm[task_id] = (y, v)

        # surrogate f(x, y_K) - <d_y g(x, y_K), v>: one backward through the trunk
        yr = detached(y, requires_grad=True)
        g = self.inner_loss(xa, yr, fs, ep.support_y, self.centre(True))
        gy = torch.autograd.grad(g, list(yr.values()), create_graph=True)
        mixed = (flat(gy) * v).sum()
        pred = split.predict({**xa, **detached(y)}, fq)
        f = self.loss(pred, ep.query_y)
        (scale * (f - mixed)).backward()
        return StepStats(float(f.detach()), self.loss.accuracy(pred, ep.query_y), {
            "cg_iterations": float(info.iterations), "cg_residual": info.residual,
            "nonpositive_curvature": float(info.nonpositive_curvature), "inner_lr": self.last_inner_lr,
        })

    def state_dict(self) -> dict[str, Any]:
        return {"warm": self._warm} if self._warm else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warm = dict(state.get("warm", {}))
