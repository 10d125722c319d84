"""The hypergradient of K gradient steps, in flat memory: what MAML and ITD-BiO differentiate, without their graph.

F(x) = f(x, y_K(x)), y_{k+1} = y_k - alpha d_y g(x, y_k), y_0 = y0(x) (a start that may depend on x: MAML's
learned init). Backpropagating through the steps gives, with a_K = d_y f(x, y_K) and H_k = d2g/dy2 at y_k,

    dF/dx = d_x f - sum_k alpha (d2g/dx dy)(y_k) a_{k+1} + (dy0/dx)' a_0,   a_k = (I - alpha H_k) a_{k+1}.

Holding H and the mixed term at the final point y_K (nothing about the path is kept):
v = alpha sum_{j<K} (I - alpha H)^j a_K (`implicit="neumann"`: K Hessian-vector products; `"damped"`: CG on
(H + delta I) v = a_K, its ridge proxy) and a_0 = (I - alpha H)^K a_K = a_K - H v (the same identity for the
damped v, where it is delta v). The surrogate f(x, y_K) - <d_y g(x, y_K), v> + <a_0, y0(x)> (y_K, v, a_0
constant) has that estimate as its x-gradient. It is exact when g is quadratic in y (H and the mixed term
constant along the path) and the steps are plain; otherwise an estimate whose error grows with how much H
changes along the K steps. Memory: one Hessian-vector-product graph at y_K, whatever K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import pytree
from .errors import UsageError
from .functional import (Objective, descend, detached, hessian_vector_product, implicit_solve, inner_value_and_grad,
                         mixed_term, outer_gradient)
from .implicit import CGInfo
from .pytree import flatten

#: the K-step systems: neumann (the K steps' own inverse) and damped (its ridge proxy), cg (y_K taken as y*)
KSTEP_SYSTEMS = ("neumann", "damped", "cg")


def k_step_adjoints(g: Objective, x: Any, y: Any, rhs: torch.Tensor, batch: Any, *, lr: float | torch.Tensor,
                    steps: int, implicit: str = "neumann", damping: float | torch.Tensor | None = None,
                    cg_steps: int = 20, cg_tol: float = 1e-10, cg_hint: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, CGInfo]:
    """(v, a_0, statistics) at the final point y = y_K of `steps` gradient steps of size `lr` (module docstring).

    v ~ lr sum_{j<K} (I - lr H)^j rhs by `implicit` (neumann, damped with `damping` >= 0, or cg: H^{-1} rhs),
    a_0 = rhs - H v: the adjoint of the start point. x and batch are used detached; flat vectors.
    K = 0: v = 0 and a_0 = rhs.
    """
    if implicit not in KSTEP_SYSTEMS:
        raise UsageError(f"the K-step hypergradient takes implicit {', '.join(KSTEP_SYSTEMS)} (got {implicit!r})")
    if steps == 0:
        zero = torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device)
        return torch.zeros_like(rhs), rhs, CGInfo(0, 0.0, True, 0, {"iterations": zero,
                                                                     "residual": zero.to(rhs.dtype), "bad": zero.bool()})
    hvp = hessian_vector_product(g, pytree.leaf_dict(x), pytree.leaf_dict(y), pytree.detach(batch))
    v, info = implicit_solve(hvp, rhs, implicit=implicit, cg_steps=cg_steps, cg_tol=cg_tol, damping=damping, lr=lr,
                             steps=steps, cg_hint=cg_hint)
    return v, rhs - hvp(v), info


@dataclass
class KStepInfo:
    """What `k_step_hypergradient` computed besides the gradient: f at y_K (detached), y_K, v and a_0 (flat),
    the system's statistics."""

    outer_loss: torch.Tensor
    y: Any
    v: torch.Tensor
    a0: torch.Tensor
    solve: CGInfo


def k_step_hypergradient(g: Objective, f: Callable[[Any, Any, Any], torch.Tensor], x: Any, y0: Any, *,
                         inner_batch: Any = None, outer_batch: Any = None, steps: int = 20, lr: float = 0.1,
                         implicit: str = "neumann", damping: float | None = None, cg_steps: int = 20,
                         cg_tol: float = 1e-10) -> tuple[dict[str, torch.Tensor], KStepInfo]:
    """The x-gradient of f(x, y_K) after `steps` plain gradient steps of size `lr` on g(x, .) from y0, estimated
    at y_K without a graph over the steps (module docstring): exact when g is quadratic in y.

    Args:
        g, f: inner and outer losses g(x, y, inner_batch), f(x, y, outer_batch) -> scalar; x, y flat dicts.
        x: the outer variables (a flat dict; gradients for those that require grad).
        y0: the start (a flat dict), computed from x with its graph where it depends on x (e.g. x itself).
        implicit, damping, cg_steps, cg_tol: the system (`k_step_adjoints`).

    Returns:
        (grads over x's entries that require grad, `KStepInfo`).

    Example:
        >>> import torch
        >>> g = lambda x, y, a: 0.5 * (y["w"] - x["s"] * a).pow(2).sum()
        >>> f = lambda x, y, b: 0.5 * y["w"].pow(2).sum()
        >>> x = {"s": torch.tensor(1.0, dtype=torch.float64, requires_grad=True)}
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> grads, info = k_step_hypergradient(g, f, x, {"w": 0 * x["s"] * a}, inner_batch=a, steps=1, lr=0.5)
        >>> grads["s"]  # y_1 = s a / 2, F = s^2 |a|^2 / 8, dF/ds = |a|^2 / 4
        tensor(1.2500, dtype=torch.float64)
    """
    if not (isinstance(steps, int) and steps >= 0) or not lr > 0:
        raise UsageError(f"k_step_hypergradient needs steps >= 0 and lr > 0 (got steps={steps!r}, lr={lr!r})")
    names = [k for k, t in x.items() if t.requires_grad]
    x_d, inner_d = detached(x), pytree.detach(inner_batch)
    y, _ = descend(inner_value_and_grad(g, x_d, inner_d), detached(y0), steps, lr, guard=False)
    rhs = outer_gradient(f, x_d, y, pytree.detach(outer_batch))
    v, a0, info = k_step_adjoints(g, x_d, y, rhs, inner_d, lr=lr, steps=steps, implicit=implicit, damping=damping,
                                  cg_steps=cg_steps, cg_tol=cg_tol)
    with torch.enable_grad():
        value = f(x, y, outer_batch)
        start = (flatten(y0) * a0).sum()
        surrogate = value - mixed_term(g, x, y, v, inner_batch) + start
        found = torch.autograd.grad(surrogate, [x[k] for k in names], allow_unused=True)
    grads = {k: torch.zeros_like(x[k]) if gr is None else gr for k, gr in zip(names, found)}
    return grads, KStepInfo(value.detach(), y, v, a0, info)

