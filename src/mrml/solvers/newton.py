"""Newton's method for inner problems, and the one record every inner solve returns (`InnerSolveInfo`).

`newton_cg` minimises g over a flat vector y: the Newton direction from conjugate gradient on
Hessian-vector products (stopped at non-positive curvature, falling back to the gradient), with a
backtracking (Armijo) line search on g; no graph is kept across iterations. A linear head's
closed-form Newton runs the same rule on stacked tasks (`mrml.solvers.head.newton_heads`).

The rule: stop when ||d_y g(y)|| <= tol * max(1, ||d_y g(y_0)||), or after `max_iter` iterations
(reported as capped). Once the Newton decrement <d_y g, H^{-1} d_y g>/2 -- the decrease a full step
would bring -- is below 64 units of rounding of g, the value of g can no longer judge a step: full
steps are taken without line search (the quadratic-convergence regime) while they at least halve
||d_y g||; when one does not, the solve ends there at the rounding floor (reported as `floor`: the
tolerance was not reached, the dtype resolves no further). A line search that finds no decrease ends
the solve too (reported as stalled).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..implicit import conjugate_gradient

#: Armijo sufficient-decrease constant and the most halvings of a line search
ARMIJO, MAX_BACKTRACK = 1e-4, 40
#: the inner solvers: gradient descent (`mrml.functional.descend`) and Newton
INNER_SOLVERS = ("gd", "newton")

_CAST = {"iterations": int, "grad_norm": float, "capped": bool, "stalled": bool, "lr": float, "floor": bool}


@dataclass
class InnerSolveInfo:
    """What an inner solve did (`mrml.functional.solve_inner`, `newton_cg`, `newton_heads`, the algorithms'
    `last_inner`). The summaries -- over the tasks when they are stacked: most iterations, largest
    gradient norm, any task capped/stalled/at the floor, smallest step size -- are Python numbers or
    tensors not yet read on the host (`host()` reads them at once); per task in `rows` ((T,) tensors:
    gd "lr", "grad_norm"; `newton_heads` "iterations", "grad_norm", "capped", "stalled", "floor")."""

    solver: str
    iterations: int | torch.Tensor  # gd: accepted steps; newton: Newton iterations
    grad_norm: float | torch.Tensor  # ||d_y g(x, y)|| at the returned y
    capped: bool | torch.Tensor  # newton: stopped by the iteration cap before the tolerance
    stalled: bool | torch.Tensor = False  # newton: the line search found no decrease
    lr: float | torch.Tensor = float("nan")  # gd: the step size in use at the end (after the guard's halvings); newton: the given lr
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    floor: bool | torch.Tensor = False  # newton: stopped at the rounding floor, ||d_y g|| above the tolerance

    @property
    def converged(self) -> bool:
        """newton: reached its tolerance (not capped, stalled or at the floor); gd: always False (a fixed
        number of steps: judge `grad_norm`)."""
        return self.solver == "newton" and not (self.capped or self.stalled or self.floor)

    def host(self) -> "InnerSolveInfo":
        """This record with its summaries as Python numbers, the tensors among them read in one host read."""
        tensors = {k: getattr(self, k) for k in _CAST if isinstance(getattr(self, k), torch.Tensor)}
        if not tensors:
            return self
        device = next(iter(tensors.values())).device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        read = torch.stack([t.detach().reshape(()).to(device, dtype) for t in tensors.values()]).tolist()
        return replace(self, **{k: _CAST[k](v) for k, v in zip(tensors, read)})

    def stats(self) -> dict[str, float]:
        """The keys `MetaAlgorithm` steps report (inner_iterations, inner_grad_norm, inner_capped,
        inner_stalled) and inner_floor."""
        return {"inner_iterations": float(self.iterations), "inner_grad_norm": float(self.grad_norm),
                "inner_capped": float(self.capped), "inner_stalled": float(self.stalled),
                "inner_floor": float(self.floor)}


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
            tol: float) -> tuple[torch.Tensor, InnerSolveInfo]:
    """The damped Newton loop of the module docstring; `direction(x, d_x g, ||d_x g||)` ~ H^{-1} d_x g."""
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
    return x, InnerSolveInfo("newton", it, gnorm, gnorm > target and not (stalled or at_floor), stalled,
                             floor=at_floor)


def newton_cg(value_and_grad: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]], y0: torch.Tensor,
              max_iter: int, tol: float, cg_steps: int) -> tuple[torch.Tensor, InnerSolveInfo]:
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
