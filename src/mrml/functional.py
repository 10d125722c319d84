"""The implicit hypergradient as functions over parameter dicts: your model, your loss, your loop.

Algorithm 1 of Yang, Ma & Yu (AAAI 2025) in pieces, each usable alone (as `torch.func` works):

- `solve_inner(g, x, y0, batch)`: K gradient steps on g in y without graph, with a divergence guard
  (or Newton-CG to a tolerance) -> (y, `InnerSolveInfo`);
- `hypergradient(g, f, x, y, inner_batch=..., outer_batch=...)`: at the inner solution y (a constant),
  rhs = d_y f, v from (d2g/dy2) v = rhs on Hessian-vector products (`cg`, `damped`, `neumann`, or any
  torchopt-style `solve(matvec, b)`), and the surrogate f(x, y) - <d_y g(x, y), v> whose x-gradient is
  the hypergradient d_x f - (d2g/dx dy) v -> (grads or surrogate, `HypergradientInfo`);
- its parts: `outer_gradient` (rhs), `hessian_vector_product` + `implicit_solve` (v), `mixed_term`
  (<d_y g, v> with x attached), which `mrml.MRML` and the task-batched path compose the same way.

`g(x, y, batch)` and `f(x, y, batch)` are plain callables returning a scalar (or, with `batched=True`,
one value per task: y's tensors then carry a leading task dimension and each task's value may depend
on its own row only). x and y are dicts of tensors; a batch is anything (tensors, dicts, tuples, floats):
it is detached (`mrml.pytree.detach`) wherever x is, so tensors in it that carry a graph (trunk
features) receive their gradient through the surrogate's backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .algorithms.algo_config import INNER_SOLVERS
from .algorithms.inner import InnerInfo, newton_cg
from .errors import UsageError
from .implicit import CGInfo, conjugate_gradient, neumann_series
from .pytree import detach

#: the inner-loop divergence guard halves the step size at most this many times per task
MAX_HALVINGS = 40


def guard_rtol(dtype: torch.dtype) -> float:
    """Relative rise of the inner loss that counts as "g went up": 64 units of rounding of `dtype`
    (7.6e-6 in float32, 1.4e-14 in float64), so that rounding noise near a minimum is not divergence."""
    return 64.0 * torch.finfo(dtype).eps


Params = dict[str, torch.Tensor]
Objective = Callable[[Params, Params, Any], torch.Tensor]
ValueAndGrad = Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]

IMPLICIT_METHODS = ("cg", "damped", "neumann")


# -- flat vectors -----------------------------------------------------------------------------------
def flatten(ps: Params, batched: bool = False) -> torch.Tensor:
    """dict of tensors -> one flat vector (n,), or (T, n) rows when each tensor has a leading task dim."""
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in ps.values()], dim=1)
    return torch.cat([t.reshape(-1) for t in ps.values()])


def unflatten(v: torch.Tensor, like: Params, batched: bool = False) -> Params:
    """The inverse of `flatten`: views of `v` shaped as the tensors of `like`."""
    out, i = {}, 0
    for k, t in like.items():
        n = t[0].numel() if batched else t.numel()
        out[k] = (v[:, i : i + n] if batched else v[i : i + n]).reshape(t.shape)
        i += n
    return out


def detached(ps: Params, requires_grad: bool = False) -> Params:
    """A dict of tensors detached (leaves that require grad when asked)."""
    return {k: v.detach().requires_grad_(requires_grad) for k, v in ps.items()}


def _grads(value: torch.Tensor, ys: Params, batched: bool, create_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """d value / d y (value summed over tasks when batched), zeros where y does not enter."""
    out = torch.autograd.grad(value.sum() if batched else value, list(ys.values()), create_graph=create_graph,
                              allow_unused=True)
    return tuple(torch.zeros_like(y) if gr is None else gr for gr, y in zip(out, ys.values()))


def inner_value_and_grad(g: Objective, x: Params, batch: Any, batched: bool = False) -> ValueAndGrad:
    """y -> (g(x, y, batch) detached, d_y g as a tuple in y's order), no graph kept."""
    def value_and_grad(y: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        yr = detached(y, requires_grad=True)
        with torch.enable_grad():
            value = g(x, yr, batch)
            return value.detach(), _grads(value, yr, batched)

    return value_and_grad


# -- the inner problem -----------------------------------------------------------------------------
@dataclass
class InnerSolveInfo:
    """What `solve_inner` did. Batched: the largest gradient norm over tasks, the smallest final step
    size, and per task in `rows` ("lr", "grad_norm")."""

    solver: str
    iterations: int  # gd: accepted steps; newton: Newton iterations
    grad_norm: float  # ||d_y g(x, y)|| at the returned y
    capped: bool  # newton: stopped by the iteration cap before the tolerance
    stalled: bool  # newton: the line search found no decrease
    lr: float  # gd: the step size in use at the end (after the guard's halvings); newton: the given lr
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_inner_info(self) -> InnerInfo:
        return InnerInfo(self.iterations, self.grad_norm, self.capped, self.stalled)

    def stats(self) -> dict[str, float]:
        """The keys `MetaAlgorithm` steps report: inner_iterations, inner_grad_norm, inner_capped, inner_stalled."""
        return self.as_inner_info().stats()


def descend(value_and_grad: ValueAndGrad, y: Params, steps: int, lr: float, guard: bool = True,
            ) -> tuple[Params, float]:
    """`steps` accepted steps y <- y - lr d_y g with `value_and_grad(y)` -> (g, d_y g) (one task).

    Divergence guard (`guard=True`): a step after which g went up (or is not finite) by more than
    `guard_rtol` of y's dtype, relative, is taken back and retried from the previous point at half the
    step size, kept for the remaining steps (at most `MAX_HALVINGS` times); while g decreases this is
    plain gradient descent. Returns (y_K, the step size in use at the end). `descend_tasks` takes the
    same decisions task by task on stacked tasks.
    """
    y = dict(y)
    if not guard:
        for _ in range(steps):
            _, grads = value_and_grad(y)
            y = {k: v - lr * gk for (k, v), gk in zip(y.items(), grads)}
        return y, lr
    rtol = guard_rtol(next(iter(y.values())).dtype)
    prev: tuple[Params, float, tuple[torch.Tensor, ...]] | None = None
    done = halvings = 0
    while done < steps:
        g, grads = value_and_grad(y)
        gv = float(g)
        if prev is not None and not gv <= prev[1] + rtol * abs(prev[1]) and halvings < MAX_HALVINGS:
            lr, halvings = 0.5 * lr, halvings + 1  # g went up (or is not finite): retry the step
            y = {k: v - lr * gk for (k, v), gk in zip(prev[0].items(), prev[2])}
            continue
        prev = (y, gv, grads)
        y = {k: v - lr * gk for (k, v), gk in zip(y.items(), grads)}
        done += 1
    return y, lr


def descend_tasks(value_and_grad: ValueAndGrad, y: Params, steps: int, lr: float, guard: bool = True,
                  ) -> tuple[Params, torch.Tensor]:
    """`descend` for each task of a stack (leading dim T), `value_and_grad(y)` -> ((T,) values, grads).

    The same rule per task, decided with masks and no host synchronisation until `steps` evaluations
    are done; then, only if some task retried a step, the loop goes on for those. Returns y_K and each
    task's final step size (float64, (T,)). (One task through this costs about twice `descend` per step
    on CPU -- tensor masks instead of Python floats -- so the per-task loop keeps `descend`.)
    """
    y = dict(y)
    first = next(iter(y.values()))
    n_tasks, device = first.shape[0], first.device
    lr_t = torch.full((n_tasks,), float(lr), dtype=torch.float64, device=device)
    if not guard:
        for _ in range(steps):
            _, grads = value_and_grad(y)
            y = {k: v - lr * gk for (k, v), gk in zip(y.items(), grads)}
        return y, lr_t
    done = torch.zeros(n_tasks, dtype=torch.long, device=device)
    halvings = torch.zeros(n_tasks, dtype=torch.long, device=device)
    has_prev = torch.zeros(n_tasks, dtype=torch.bool, device=device)
    prev_g = torch.zeros(n_tasks, dtype=torch.float64, device=device)
    prev_y, prev_gr = dict(y), {k: torch.zeros_like(v) for k, v in y.items()}

    def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, *([1] * (like.dim() - 1)))

    rtol = guard_rtol(first.dtype)
    evaluations = 0
    while evaluations < steps or bool((done < steps).any()):
        g, grads = value_and_grad(y)
        gv = g.detach().to(torch.float64)  # `descend` compares Python floats (float64)
        active = done < steps
        reject = active & has_prev & ~(gv <= prev_g + rtol * prev_g.abs()) & (halvings < MAX_HALVINGS)
        accept = active & ~reject
        lr_t = torch.where(reject, 0.5 * lr_t, lr_t)
        halvings = halvings + reject.long()
        new_y, new_prev_y, new_prev_gr = {}, {}, {}
        for (k, v), gk in zip(y.items(), grads):
            step = rows(lr_t, v).to(v.dtype)
            a, r = rows(accept, v), rows(reject, v)
            new_y[k] = torch.where(a, v - step * gk, torch.where(r, prev_y[k] - step * prev_gr[k], v))
            new_prev_y[k] = torch.where(a, v, prev_y[k])
            new_prev_gr[k] = torch.where(a, gk, prev_gr[k])
        y, prev_y, prev_gr = new_y, new_prev_y, new_prev_gr
        prev_g = torch.where(accept, gv, prev_g)
        has_prev = has_prev | accept
        done = done + accept.long()
        evaluations += 1
    return y, lr_t


def solve_inner(g: Objective, x: Params, y0: Params, batch: Any, *, solver: str = "gd", steps: int = 20,
                lr: float = 0.1, tol: float = 1e-6, guard: bool = True, cg_steps: int = 20, batched: bool = False,
                ) -> tuple[Params, InnerSolveInfo]:
    """The inner solution from y0, without graph (x and batch are used detached).

    Args:
        g: the inner loss g(x, y, batch) -> scalar (batched: one value per task).
        x: outer variables (dict of tensors).
        y0: the starting point (dict of tensors; batched: stacked along a leading task dim).
        batch: the inner data, passed to g as given (detached).
        solver: "gd": `steps` gradient steps of size `lr` with the divergence guard of `descend`
            (`guard=False`: plain gradient descent); "newton": Newton-CG (`cg_steps` CG steps per
            direction, Armijo line search) until ||d_y g|| <= tol * max(1, ||d_y g(y0)||), at most
            `steps` iterations (one task only).
        batched: y0 holds a stack of tasks (see the module docstring); gd only.

    Returns:
        (y, info): y detached, shaped as y0; `InnerSolveInfo` with the final gradient norm and step size.

    Example:
        >>> import torch
        >>> from mrml.functional import solve_inner
        >>> def g(x, y, batch):  # ridge: 0.5 ||y - x a||^2 + 0.5 ||y||^2, minimiser y* = x a / 2
        ...     return 0.5 * (y["w"] - x["s"] * batch).pow(2).sum() + 0.5 * y["w"].pow(2).sum()
        >>> x, y0, a = {"s": torch.tensor(2.0)}, {"w": torch.zeros(3)}, torch.tensor([1.0, 2.0, 3.0])
        >>> y, info = solve_inner(g, x, y0, a, steps=50, lr=0.4)
        >>> y["w"], info.grad_norm < 1e-6
        (tensor([1., 2., 3.]), True)
    """
    if solver not in INNER_SOLVERS:
        raise UsageError(f"solver must be one of {', '.join(INNER_SOLVERS)} (got {solver!r})")
    if not (isinstance(steps, int) and steps >= 0):
        raise UsageError(f"steps must be an integer >= 0 (got {steps!r})")
    if not lr > 0 or not tol > 0:
        raise UsageError(f"lr and tol must be > 0 (got lr={lr}, tol={tol})")
    if not y0:
        raise UsageError("y0 must be a non-empty dict of tensors (the inner variables)")
    x, batch = detached(x), detach(batch)
    value_and_grad = inner_value_and_grad(g, x, batch, batched)
    if solver == "newton":
        if batched:
            raise UsageError("solver='newton' solves one task: call it per task, or use solver='gd' with batched=True")
        like = detached(y0)

        def flat_value_and_grad(v: torch.Tensor, graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
            if not graph:
                value, grads = value_and_grad(unflatten(v, like))
                return value, flatten(dict(zip(like, grads)))
            value = g(x, unflatten(v, like), batch)
            return value, torch.autograd.grad(value, v, create_graph=True)[0]

        v, info = newton_cg(flat_value_and_grad, flatten(like), steps, tol, cg_steps)
        return unflatten(v, like), InnerSolveInfo("newton", info.iterations, info.grad_norm, info.capped,
                                                  info.stalled, float(lr))
    if batched:
        y, lr_t = descend_tasks(value_and_grad, detached(y0), steps, lr, guard)
        norms = flatten(dict(zip(y, value_and_grad(y)[1])), batched=True).norm(dim=1)
        return y, InnerSolveInfo("gd", steps, float(norms.max()), False, False, float(lr_t.min()),
                                 {"lr": lr_t, "grad_norm": norms})
    y, lr_end = descend(value_and_grad, detached(y0), steps, lr, guard)
    norm = float(flatten(dict(zip(y, value_and_grad(y)[1]))).norm())
    return y, InnerSolveInfo("gd", steps, norm, False, False, lr_end)


# -- the hypergradient's parts ------------------------------------------------------------------------
def outer_gradient(f: Callable[[Params, Params, Any], Any], x: Params, y: Params, batch: Any, *,
                   batched: bool = False, has_aux: bool = False) -> torch.Tensor:
    """d_y f(x, y, batch), flat ((T, n) rows when batched), detached; the right-hand side of the system.
    `has_aux`: f returns (value, aux) and aux is ignored here."""
    yr = detached(y, requires_grad=True)
    with torch.enable_grad():
        value = f(x, yr, batch)
        value = value[0] if has_aux else value
        return flatten(dict(zip(yr, _grads(value, yr, batched))), batched).detach()


def hessian_vector_product(g: Objective, x: Params, y: Params, batch: Any, *, batched: bool = False,
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (d2g/dy2) v at y on flat vectors ((T, n) rows when batched: each task's Hessian on its row).
    The graph of d_y g is built once here; each product is one backward pass through it (it lives as
    long as the returned function)."""
    yr = detached(y, requires_grad=True)
    with torch.enable_grad():
        grads = _grads(g(x, yr, batch), yr, batched, create_graph=True)
    ys = list(yr.values())

    def matvec(v: torch.Tensor) -> torch.Tensor:
        parts = list(unflatten(v, yr, batched).values())
        hv = torch.autograd.grad(grads, ys, grad_outputs=parts, retain_graph=True, allow_unused=True)
        return flatten({k: torch.zeros_like(t) if h is None else h for (k, t), h in zip(yr.items(), hv)},
                       batched).detach()

    return matvec


def implicit_solve(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *,
                   implicit: str | Callable = "cg", cg_steps: int = 20, cg_tol: float = 1e-10,
                   v0: torch.Tensor | None = None, damping: float | None = None, lr: float | None = None,
                   steps: int | None = None) -> tuple[torch.Tensor, CGInfo]:
    """v ~ A^{-1} rhs on flat vectors, A = d2g/dy2 through `matvec`, by `implicit`:

    - "cg": `cg_steps` conjugate-gradient steps (stops at relative residual `cg_tol`), from `v0` if given;
    - "damped": the same on (A + damping I) (`damping` >= 0 required; mrml uses max(0, 1/(lr K) - lambda));
    - "neumann": v = lr sum_{j<steps} (I - lr A)^j rhs (`lr`, `steps` required: the K gradient steps' inverse);
    - a callable `solve(matvec, b) -> x` (torchopt's contract, e.g. `mrml.implicit.cg_solver()`); its
      statistics are the relative residual (one product more), iterations 0.
    """
    _check_implicit(implicit, damping, lr, steps)
    if callable(implicit):
        v = implicit(matvec, rhs)
        bnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
        resid = (matvec(v) - rhs).norm(dim=-1) / bnorm
        zeros = torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device)
        rows = {"iterations": zeros, "residual": resid, "bad": zeros.bool()}
        return v, CGInfo(0, float(resid.max()), bool((resid <= cg_tol).all()), 0, rows)
    if implicit == "cg":
        return conjugate_gradient(matvec, rhs, cg_steps, cg_tol, x0=v0)
    if implicit == "damped":
        return conjugate_gradient(lambda v: matvec(v) + damping * v, rhs, cg_steps, cg_tol, x0=v0)
    return neumann_series(matvec, rhs, lr, steps)


def _check_implicit(implicit: str | Callable, damping: float | None, lr: float | None, steps: int | None) -> None:
    if callable(implicit):
        return
    if implicit not in IMPLICIT_METHODS:
        raise UsageError(f"implicit must be one of {', '.join(IMPLICIT_METHODS)} or a solve(matvec, b) callable "
                         f"(got {implicit!r})")
    if implicit == "damped" and (damping is None or not damping >= 0):
        raise UsageError(f"implicit='damped' needs damping >= 0 (got {damping!r})")
    if implicit == "neumann" and (lr is None or steps is None or not lr > 0 or steps < 1):
        raise UsageError(f"implicit='neumann' needs lr > 0 and steps >= 1 (got lr={lr!r}, steps={steps!r})")


def mixed_term(g: Objective, x: Params, y: Params, v: torch.Tensor, batch: Any, *, batched: bool = False,
               ) -> torch.Tensor:
    """<d_y g(x, y, batch), v> with y and v constant and x, batch attached (one value per task when
    batched): its x-gradient is (d2g/dx dy) v."""
    yr = detached(y, requires_grad=True)
    with torch.enable_grad():
        grads = _grads(g(x, yr, batch), yr, batched, create_graph=True)
        return (flatten(dict(zip(yr, grads)), batched) * v).sum(-1)


# -- the hypergradient ----------------------------------------------------------------------------------
@dataclass
class HypergradientInfo:
    """What `hypergradient` computed besides the gradient."""

    outer_loss: torch.Tensor  # f(x, y), detached (one value per task when batched)
    v: Params  # the linear system's solution, shaped as y (detached)
    solve: CGInfo  # its statistics: iterations, residual, converged, nonpositive_curvature, per-task rows
    inner: InnerSolveInfo | None = None  # what the inner solve reported, when passed in
    aux: Any = None  # f's auxiliary output (has_aux=True), e.g. the predictions

    def stats(self) -> dict[str, float]:
        """Flat statistics: outer_loss (mean over tasks), cg_iterations, cg_residual, nonpositive_curvature,
        and the inner solve's."""
        out = {"outer_loss": float(self.outer_loss.mean()), "cg_iterations": float(self.solve.iterations),
               "cg_residual": self.solve.residual, "nonpositive_curvature": float(self.solve.nonpositive_curvature)}
        return {**out, **(self.inner.stats() if self.inner is not None else {})}


def hypergradient(g: Objective, f: Callable[[Params, Params, Any], Any], x: Params, y: Params, *,
                  inner_batch: Any = None, outer_batch: Any = None, implicit: str | Callable = "cg",
                  cg_steps: int = 20, cg_tol: float = 1e-10, v0: Params | torch.Tensor | None = None,
                  damping: float | None = None, lr: float | None = None, steps: int | None = None,
                  inner_info: InnerSolveInfo | None = None, has_aux: bool = False, batched: bool = False,
                  return_surrogate: bool = False) -> tuple[Any, HypergradientInfo]:
    """The implicit hypergradient of f(x, y*(x)) at an inner solution y (Algorithm 1, after the inner loop).

    With y constant: rhs = d_y f(x, y); v solves (d2g/dy2) v = rhs (x and the batches detached); the
    surrogate f(x, y) - <d_y g(x, y), v> (x and the batches attached) has x-gradient
    d_x f - (d2g/dx dy) v, the implicit-function-theorem hypergradient when d_y g(x, y) = 0.
    Memory does not depend on the number of inner or CG steps.

    Args:
        g: inner loss g(x, y, inner_batch) -> scalar.  f: outer loss f(x, y, outer_batch) -> scalar,
            or (scalar, aux) with `has_aux=True`.
        x: outer variables (dict of tensors; gradients for those that require grad).
        y: the inner solution (dict of tensors), e.g. from `solve_inner`; used as a constant.
        inner_batch, outer_batch: data for g and f (any tree; tensors in them may carry graph).
        implicit: "cg" | "damped" | "neumann" | a torchopt-style `solve(matvec, b)`; see `implicit_solve`
            (`damping` for damped; `lr`, `steps` for neumann).
        cg_steps, cg_tol, v0: conjugate-gradient steps, relative tolerance, warm start (dict like y or flat).
        inner_info: the inner solve's report, carried into the returned info.
        batched: y holds a stack of tasks, g and f return one value per task (see the module docstring).
        return_surrogate: return the surrogate scalar (summed over tasks when batched) to backpropagate
            yourself (into x and anything attached in the batches) instead of the x-gradients.

    Returns:
        (grads, info): grads a dict {name: d/dx} over the x entries that require grad (summed over tasks
        when batched), or the surrogate; and a `HypergradientInfo`.

    Example:
        >>> import torch
        >>> from mrml.functional import hypergradient
        >>> g = lambda x, y, a: 0.5 * (y["w"] - x["s"] * a).pow(2).sum() + 0.5 * y["w"].pow(2).sum()
        >>> f = lambda x, y, b: 0.5 * (y["w"] - b).pow(2).sum()
        >>> x = {"s": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> b = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> y = {"w": x["s"].detach() * a / 2}  # y*(x) = s a / 2, so d f(y*) / ds = <y* - b, a / 2>
        >>> grads, info = hypergradient(g, f, x, y, inner_batch=a, outer_batch=b)
        >>> grads["s"], info.solve.converged
        (tensor(1.5000, dtype=torch.float64), True)
    """
    yd = detached(y)
    if not yd:
        raise UsageError("y must be a non-empty dict of tensors (the inner solution)")
    _check_implicit(implicit, damping, lr, steps)
    if batched and callable(implicit):
        raise UsageError("a solve(matvec, b) callable would solve the stacked tasks as one system: with batched=True "
                         "use implicit='cg' (one solve per task), or call hypergradient per task")
    x_d, inner_d, outer_d = detached(x), detach(inner_batch), detach(outer_batch)
    rhs = outer_gradient(f, x_d, yd, outer_d, batched=batched, has_aux=has_aux)
    if isinstance(v0, dict):
        v0 = flatten(detached(v0), batched)
    v, solve_info = implicit_solve(hessian_vector_product(g, x_d, yd, inner_d, batched=batched), rhs,
                                   implicit=implicit, cg_steps=cg_steps, cg_tol=cg_tol, v0=v0, damping=damping,
                                   lr=lr, steps=steps)
    with torch.enable_grad():
        mixed = mixed_term(g, x, yd, v, inner_batch, batched=batched)
        out = f(x, yd, outer_batch)
        value, aux = out if has_aux else (out, None)
        surrogate = (value - mixed).sum()
    info = HypergradientInfo(value.detach(), unflatten(v, yd, batched), solve_info, inner_info, aux)
    if return_surrogate:
        return surrogate, info
    names = [k for k, t in x.items() if t.requires_grad]
    if not names:
        return {}, info
    if not surrogate.requires_grad:
        return {k: torch.zeros_like(x[k]) for k in names}, info
    grads = torch.autograd.grad(surrogate, [x[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(x[k]) if gr is None else gr for k, gr in zip(names, grads)}, info
