"""Exact inner solvers: drive ||d_y g|| below a tolerance, keeping no graph across iterations.

`newton_cg`: for any inner part: the Newton direction from conjugate gradient on Hessian-vector
products (stopped at non-positive curvature, falling back to the gradient), with a backtracking
(Armijo) line search on g (a linear head's closed-form Newton runs on stacked tasks:
`mrml.solvers.head.newton_heads`, the same rule). It stops when ||d_y g(y)|| <= tol * max(1, ||d_y g(y_0)||), or after `max_iter` iterations (reported
as capped). Once the Newton decrement <d_y g, H^{-1} d_y g>/2 -- the decrease a full step would
bring -- is below 64 units of rounding of g, the value of g can no longer judge a step: full steps
are taken without line search (the quadratic-convergence regime) while they at least halve
||d_y g||; when one does not, the solve ends there at the rounding floor (reported as `floor`: the
tolerance was not reached, the dtype resolves no further). A line search that finds no decrease ends
the solve too (reported as stalled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..implicit import conjugate_gradient

#: Armijo sufficient-decrease constant and the most halvings of a line search
ARMIJO, MAX_BACKTRACK = 1e-4, 40


@dataclass
class InnerInfo:
    """What an inner solve did: iterations (or steps), final ||d_y g||, whether it hit its cap, stalled, or
    stopped at the rounding floor above the tolerance (`floor`)."""

    iterations: int
    grad_norm: float
    capped: bool
    stalled: bool = False
    floor: bool = False

    def stats(self) -> dict[str, float]:
        return {"inner_iterations": float(self.iterations), "inner_grad_norm": self.grad_norm,
                "inner_capped": float(self.capped), "inner_stalled": float(self.stalled)}


def _line_search(value_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                 d: torch.Tensor, g0: float, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Largest t in 1, 1/2, 1/4, ... with g(x - t d) <= g0 - ARMIJO t slope, as (point, g, d g) there (the
    gradient comes with the value, so the accepted point costs nothing more); None if none decreases."""
    t = 1.0
    for _ in range(MAX_BACKTRACK):
        xn = x - t * d
        gn, grad = value_grad(xn)
        if float(gn) <= g0 - ARMIJO * t * slope:
            return xn, gn, grad
        t *= 0.5
    return None


def _newton(value_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
            direction: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], x0: torch.Tensor, max_iter: int,
            tol: float) -> tuple[torch.Tensor, InnerInfo]:
    """The damped Newton loop shared by both solvers; `direction(x, d_x g, ||d_x g||)` ~ H^{-1} d_x g."""
    x = x0.detach()
    g, grad = value_grad(x)
    gnorm0 = float(grad.norm())
    target = tol * max(1.0, gnorm0)
    floor = 64.0 * torch.finfo(x.dtype).eps
    gnorm, it, stalled, at_floor = gnorm0, 0, False, False
    while gnorm > target and it < max_iter:
        d = direction(x, grad, gnorm)
        slope = float((grad * d).sum())
        if 0 < slope <= 2 * floor * max(1.0, abs(float(g))):  # g cannot judge the step: take it whole
            xn = x - d
            gn, gradn = value_grad(xn)
            if not float(gradn.norm()) <= 0.5 * gnorm:
                at_floor = True  # rounding floor reached above the tolerance
                break
            x, g, grad, gnorm, it = xn, gn, gradn, float(gradn.norm()), it + 1
            continue
        if not slope > 0:  # rounding or negative curvature made the direction useless: take the gradient
            d, slope = grad, float((grad * grad).sum())
        found = _line_search(value_grad, x, d, float(g), slope)
        if found is None:
            stalled = True
            break
        x, g, grad = found
        gnorm, it = float(grad.norm()), it + 1
    return x, InnerInfo(it, gnorm, gnorm > target and not (stalled or at_floor), stalled, at_floor)


def newton_cg(value_and_grad: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]], y0: torch.Tensor,
              max_iter: int, tol: float, cg_steps: int) -> tuple[torch.Tensor, InnerInfo]:
    """Minimise g over a flat vector y by Newton-CG; `value_and_grad(y, graph)` -> (g, d_y g) where
    `graph=True` keeps the graph of d_y g for Hessian-vector products (freed each iteration), `False`
    returns detached values."""

    def direction(y: torch.Tensor, grad: torch.Tensor, gnorm: float) -> torch.Tensor:
        yr = y.detach().requires_grad_(True)
        with torch.enable_grad():
            _, gr = value_and_grad(yr, True)

            def hvp(v: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(gr, yr, grad_outputs=v, retain_graph=True)[0].detach()

            return conjugate_gradient(hvp, grad, max(cg_steps, 1), tol=1e-2 * min(1.0, gnorm))[0]

    return _newton(lambda y: value_and_grad(y, False), direction, y0, max_iter, tol)
