"""Exact inner solvers: drive ||d_y g|| below a tolerance, keeping no graph across iterations.

- `newton_head`: Newton's method with the closed-form Hessian of a linear head (`linear_head`), a
  backtracking (Armijo) line search on g, quadratic convergence on the strongly convex inner loss.
- `newton_cg`: for any inner part: the Newton direction from conjugate gradient on Hessian-vector
  products (stopped at non-positive curvature, falling back to the gradient), with the same line
  search.

Both stop when ||d_y g(y)|| <= tol * max(1, ||d_y g(y_0)||), after `max_iter` iterations (reported
as capped), or when the line search finds no decrease (reported as stalled: the tolerance is below
what the dtype resolves).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..implicit import conjugate_gradient
from .linear_head import LinearHeadLoss

#: Armijo sufficient-decrease constant and the most halvings of a line search
ARMIJO, MAX_BACKTRACK = 1e-4, 40


@dataclass
class InnerInfo:
    """What an inner solve did: iterations (or steps), final ||d_y g||, whether it hit its cap or stalled."""

    iterations: int
    grad_norm: float
    capped: bool
    stalled: bool = False

    def stats(self) -> dict[str, float]:
        return {"inner_iterations": float(self.iterations), "inner_grad_norm": self.grad_norm,
                "inner_capped": float(self.capped), "inner_stalled": float(self.stalled)}


def _line_search(value: Callable[[torch.Tensor], float], x: torch.Tensor, d: torch.Tensor, g0: float,
                 slope: float) -> tuple[torch.Tensor, float] | None:
    """Largest t in 1, 1/2, 1/4, ... with value(x - t d) <= g0 - ARMIJO t slope; None if none decreases."""
    t = 1.0
    for _ in range(MAX_BACKTRACK):
        xn = x - t * d
        gn = value(xn)
        if gn <= g0 - ARMIJO * t * slope:
            return xn, gn
        t *= 0.5
    return None


def newton_head(problem: LinearHeadLoss, w0: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, InnerInfo]:
    """Minimise the linear head's inner loss from W0 by Newton's method with the closed-form Hessian."""
    w = w0.detach()
    g, grad = problem.value_grad(w)
    gnorm0 = float(grad.norm())
    target = tol * max(1.0, gnorm0)
    gnorm, it, stalled = gnorm0, 0, False
    while gnorm > target and it < max_iter:
        d = problem.solve(w, grad)
        slope = float((grad * d).sum())
        if not slope > 0:  # rounding made the Newton direction useless: take the gradient
            d, slope = grad, float((grad * grad).sum())
        found = _line_search(lambda x: float(problem.value(x)), w, d, float(g), slope)
        if found is None:
            stalled = True
            break
        w = found[0]
        g, grad = problem.value_grad(w)
        gnorm, it = float(grad.norm()), it + 1
    return w, InnerInfo(it, gnorm, gnorm > target and not stalled, stalled)


def newton_cg(value_and_grad: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]], y0: torch.Tensor,
              max_iter: int, tol: float, cg_steps: int) -> tuple[torch.Tensor, InnerInfo]:
    """Minimise g over a flat vector y by Newton-CG; `value_and_grad(y, graph)` -> (g, d_y g) where
    `graph=True` keeps the graph of d_y g for Hessian-vector products (freed each iteration), `False`
    returns detached values."""
    y = y0.detach()
    g, grad = value_and_grad(y, False)
    gnorm0 = float(grad.norm())
    target = tol * max(1.0, gnorm0)
    gnorm, it, stalled = gnorm0, 0, False
    while gnorm > target and it < max_iter:
        yr = y.detach().requires_grad_(True)
        with torch.enable_grad():
            _, gr = value_and_grad(yr, True)

            def hvp(v: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(gr, yr, grad_outputs=v, retain_graph=True)[0].detach()

            d, _ = conjugate_gradient(hvp, grad, max(cg_steps, 1), tol=1e-2 * min(1.0, gnorm))
        del gr
        slope = float((grad * d).sum())
        if not slope > 0:  # CG met negative curvature at once: steepest descent
            d, slope = grad, float((grad * grad).sum())

        found = _line_search(lambda x: float(value_and_grad(x, False)[0]), y, d, float(g), slope)
        if found is None:
            stalled = True
            break
        y = found[0]
        g, grad = value_and_grad(y, False)
        gnorm, it = float(grad.norm()), it + 1
    return y, InnerInfo(it, gnorm, gnorm > target and not stalled, stalled)
