"""The implicit hypergradient as functions over parameter dicts: your model, your loss, your loop.

Algorithm 1 of Yang, Ma & Yu (AAAI 2025) in pieces, each usable alone (as `torch.func` works):

- `solve_inner(g, x, y0, batch)`: Newton-CG to a tolerance (by default) or K gradient steps with a
  divergence guard, on g in y without graph -> (y, `InnerSolveInfo`);
- `hypergradient(g, f, x, y, inner_batch=..., outer_batch=...)`: at the inner solution y (a constant),
  rhs = d_y f, v from (d2g/dy2) v = rhs on Hessian-vector products (`cg`, `damped`, `neumann`, or any
  torchopt-style `solve(matvec, b)`) or the dense Hessian (`direct`, small y), and the surrogate
  f(x, y) - <d_y g(x, y), v> whose x-gradient is the hypergradient d_x f - (d2g/dx dy) v -> (grads or
  surrogate, `HypergradientInfo`); it warns (or raises, `strict=True`) when that is not what it computed;
- its parts: `outer_gradient` (rhs), `hessian_vector_product` + `implicit_solve` (v), `mixed_term`
  (<d_y g, v> with x attached), which `mrml.MRML` and the task-batched path compose the same way.

`g(x, y, batch)` and `f(x, y, batch)` are plain callables returning a scalar (or, with `batched=True`,
one value per task: y's tensors then carry a leading task dimension and each task's value may depend
on its own row only). x and y are trees of tensors (dicts, tuples, lists, nested; flat dicts inside,
`mrml.pytree.leaf_dict`), g and f receive them in their own structure; a batch is anything (tensors,
dicts, tuples, floats): it is detached (`mrml.pytree.detach`) wherever x is, so tensors in it that carry a graph (trunk
features) receive their gradient through the surrogate's backward.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .errors import UsageError
from .implicit import CGInfo, conjugate_gradient, neumann_series
from .solvers.newton import INNER_SOLVERS, InnerSolveInfo, newton_cg  # noqa: F401 (InnerSolveInfo re-exported)
from . import pytree
from .pytree import detach, flatten, unflatten  # noqa: F401 (flatten, unflatten re-exported)

#: the inner-loop divergence guard halves the step size at most this many times per task
MAX_HALVINGS = 40


def guard_rtol(dtype: torch.dtype) -> float:
    """Relative rise of the inner loss that counts as "g went up": 64 units of rounding of `dtype`
    (7.6e-6 in float32, 1.4e-14 in float64), so that rounding noise near a minimum is not divergence."""
    return 64.0 * torch.finfo(dtype).eps


Params = dict[str, torch.Tensor]
Objective = Callable[[Params, Params, Any], torch.Tensor]
ValueAndGrad = Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]

IMPLICIT_METHODS = ("cg", "direct", "damped", "neumann")


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


#: `solve_inner`'s default iteration cap: Newton iterations (solver="newton"), gradient steps ("gd")
NEWTON_STEPS, GD_STEPS = 100, 20


def default_tol(dtype: torch.dtype) -> float:
    """`solve_inner`'s default tolerance on ||d_y g|| (relative to max(1, ||d_y g(y0)||)): the square root
    of `dtype`'s rounding unit, 1.5e-8 in float64, 3.5e-4 in float32 -- Newton converges quadratically,
    so the step that reaches it usually lands at the rounding floor."""
    return torch.finfo(dtype).eps ** 0.5


def solve_inner(g: Objective, x: Any, y0: Any, batch: Any, *, solver: str = "newton", steps: int | None = None,
                lr: float = 0.1, tol: float | None = None, guard: bool = True, cg_steps: int = 20,
                batched: bool = False) -> tuple[Any, InnerSolveInfo]:
    """The inner solution from y0, without graph (x and batch are used detached).

    By default it solves to tolerance: Newton-CG until ||d_y g|| <= tol * max(1, ||d_y g(y0)||), `tol`
    `default_tol` of y0's dtype, at most `NEWTON_STEPS` iterations; the info says how it ended
    (`capped`, `stalled`, `floor`). Gradient descent (`solver="gd"`) takes a fixed number of steps.

    Args:
        g: the inner loss g(x, y, batch) -> scalar (batched: one value per task).
        x: outer variables (a tree of tensors: dict, tuple, list, nested).
        y0: the starting point (a tree of tensors; batched: stacked along a leading task dim).
        batch: the inner data, passed to g as given (detached).
        solver: "newton" (default): Newton-CG (`cg_steps` CG steps per direction, Armijo line search)
            until the tolerance, at most `steps` iterations (default `NEWTON_STEPS`; one task only);
            "gd": `steps` gradient steps (default `GD_STEPS`) of size `lr` with the divergence guard of
            `descend` (`guard=False`: plain gradient descent).
        tol: Newton's relative tolerance (default `default_tol(dtype)`); gd ignores it.
        batched: y0 holds a stack of tasks (see the module docstring); gd only.

    Returns:
        (y, info): y detached, in y0's structure; `InnerSolveInfo` with the final gradient norm, step size
        and, for Newton, whether it hit the cap, stalled or stopped at the rounding floor above `tol`.

    Example:
        >>> import torch
        >>> from mrml.functional import solve_inner
        >>> def g(x, y, batch):  # ridge: 0.5 ||y - x a||^2 + 0.5 ||y||^2, minimiser y* = x a / 2
        ...     return 0.5 * (y["w"] - x["s"] * batch).pow(2).sum() + 0.5 * y["w"].pow(2).sum()
        >>> x, y0, a = {"s": torch.tensor(2.0)}, {"w": torch.zeros(3)}, torch.tensor([1.0, 2.0, 3.0])
        >>> y, info = solve_inner(g, x, y0, a)
        >>> y["w"], info.grad_norm < 1e-6, info.converged
        (tensor([1., 2., 3.]), True, True)
        >>> y, info = solve_inner(g, x, y0, a, solver="gd", steps=50, lr=0.4)
        >>> y["w"], info.grad_norm < 1e-6
        (tensor([1., 2., 3.]), True)
    """
    if solver not in INNER_SOLVERS:
        raise UsageError(f"solver must be one of {', '.join(INNER_SOLVERS)} (got {solver!r})")
    if steps is None:
        steps = NEWTON_STEPS if solver == "newton" else GD_STEPS
    if not (isinstance(steps, int) and steps >= 0):
        raise UsageError(f"steps must be an integer >= 0 (got {steps!r})")
    ys = pytree.leaf_dict(y0)
    if not ys:
        raise UsageError("y0 must hold tensors (the inner variables: a dict, tuple or list of tensors)")
    if tol is None:
        tol = default_tol(next(iter(ys.values())).dtype)
    if not lr > 0 or not tol > 0:
        raise UsageError(f"lr and tol must be > 0 (got lr={lr}, tol={tol})")
    xs = pytree.leaf_dict(x)
    g = _on_leaf_dicts(g, x, y0)
    y, info = _solve_inner(g, detached(xs), detached(ys), detach(batch), solver, steps, lr, tol, guard,
                           cg_steps, batched)
    return (y if ys is y0 else pytree.rebuild(y0, y.values())), info


def _solve_inner(g: Objective, x: Params, y0: Params, batch: Any, solver: str, steps: int, lr: float, tol: float,
                 guard: bool, cg_steps: int, batched: bool) -> tuple[Params, InnerSolveInfo]:
    value_and_grad = inner_value_and_grad(g, x, batch, batched)
    if solver == "newton":
        if batched:
            raise UsageError("solver='newton' (the default) solves one task: call it per task, or pass solver='gd' "
                             "(with steps and lr) for batched=True")

        def flat_value_and_grad(v: torch.Tensor, graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
            if not graph:
                value, grads = value_and_grad(unflatten(v, y0))
                return value, flatten(dict(zip(y0, grads)))
            value = g(x, unflatten(v, y0), batch)
            return value, torch.autograd.grad(value, v, create_graph=True)[0]

        v, info = newton_cg(flat_value_and_grad, flatten(y0), steps, tol, cg_steps)
        return unflatten(v, y0), replace(info, lr=float(lr))
    if batched:
        y, lr_t = descend_tasks(value_and_grad, y0, steps, lr, guard)
        norms = flatten(dict(zip(y, value_and_grad(y)[1])), batched=True).norm(dim=1)
        return y, InnerSolveInfo("gd", steps, norms.max(), False, False, lr_t.min(),
                                 {"lr": lr_t, "grad_norm": norms})
    y, lr_end = descend(value_and_grad, y0, steps, lr, guard)
    norm = float(flatten(dict(zip(y, value_and_grad(y)[1]))).norm())
    return y, InnerSolveInfo("gd", steps, norm, False, False, lr_end)


def _on_leaf_dicts(fn: Callable, x_like: Any, y_like: Any) -> Callable:
    """fn(x, y, batch) over trees as a function of their `leaf_dict`s (fn itself when both are flat dicts)."""
    if pytree.is_flat_dict(x_like) and pytree.is_flat_dict(y_like):
        return fn
    return lambda x, y, batch: fn(pytree.rebuild(x_like, x.values()), pytree.rebuild(y_like, y.values()), batch)


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


def _inner_grad_graph(g: Objective, x: Params, y: Params, batch: Any, batched: bool,
                      ) -> tuple[Params, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(y as leaves requiring grad, g there detached, d_y g with its graph kept)."""
    yr = detached(y, requires_grad=True)
    with torch.enable_grad():
        value = g(x, yr, batch)
        return yr, value.detach(), _grads(value, yr, batched, create_graph=True)


def hessian_vector_product(g: Objective, x: Params, y: Params, batch: Any, *, batched: bool = False,
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (d2g/dy2) v at y on flat vectors ((T, n) rows when batched: each task's Hessian on its row).
    The graph of d_y g is built once here; each product is one backward pass through it (it lives as
    long as the returned function). `matvec.columns(V)` takes a stack of m vectors (m, n) ((m, T, n)
    batched) in one vectorised backward pass (the dense Hessian of `implicit="direct"`)."""
    yr, _, grads = _inner_grad_graph(g, x, y, batch, batched)
    return _matvec(yr, grads, batched)


def _matvec(yr: Params, grads: tuple[torch.Tensor, ...], batched: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    ys = list(yr.values())

    def products(parts: list[torch.Tensor], many: bool) -> list[torch.Tensor]:
        hv = torch.autograd.grad(grads, ys, grad_outputs=parts, retain_graph=True, allow_unused=True,
                                 is_grads_batched=many)
        return [torch.zeros_like(p) if h is None else h for p, h in zip(parts, hv)]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return flatten(dict(zip(yr, products(list(unflatten(v, yr, batched).values()), False))), batched).detach()

    def columns(vs: torch.Tensor) -> torch.Tensor:
        parts, i = [], 0
        for t in ys:
            k = t[0].numel() if batched else t.numel()
            parts.append(vs[..., i : i + k].reshape(vs.shape[0], *t.shape))
            i += k
        hv = products(parts, True)
        return torch.cat([h.reshape(*vs.shape[:-1], -1) for h in hv], dim=-1).detach()

    matvec.columns = columns  # type: ignore[attr-defined]
    return matvec


#: `implicit="direct"` forms the dense Hessian: y (per task) may have at most this many elements
DIRECT_MAX = 4096


def direct_solve(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, tol: float = 1e-10,
                 ) -> tuple[torch.Tensor, CGInfo]:
    """v = A^{-1} rhs with the dense A (n <= `DIRECT_MAX`) formed from `matvec` (by `matvec.columns` when
    it has it, else column by column) and symmetrised: Cholesky when A is positive definite (every task
    when batched), LU otherwise. Statistics: iterations 0, the relative residual ||A v - rhs|| / ||rhs||
    (per task in rows), converged when it is finite and <= max(tol, sqrt(eps)), and how many tasks'
    A is not positive definite (reported as nonpositive_curvature, rows["bad"])."""
    n = rhs.shape[-1]
    if n > DIRECT_MAX:
        raise UsageError(f"implicit='direct' forms the dense {n} x {n} Hessian of g in y: at most {DIRECT_MAX} "
                         "elements of y (per task); use implicit='cg'")
    eye = torch.eye(n, dtype=rhs.dtype, device=rhs.device)
    basis = eye.reshape(n, *([1] * (rhs.dim() - 1)), n).expand(n, *rhs.shape)  # (n, [T,] n): e_j for every task
    columns = getattr(matvec, "columns", None)
    cols = columns(basis) if columns is not None else torch.stack([matvec(e) for e in basis])
    a = cols.movedim(0, -1)  # [T,] n, n: column j is A e_j
    a = 0.5 * (a + a.mT)
    chol, info = torch.linalg.cholesky_ex(a)
    spd = info == 0
    if bool(spd.all()):
        v = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    else:
        v = torch.linalg.solve_ex(a, rhs)[0]
    bnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    resid = ((a @ v.unsqueeze(-1)).squeeze(-1) - rhs).norm(dim=-1) / bnorm
    resid = torch.where(torch.isfinite(v).all(-1), resid, torch.full_like(resid, float("nan")))
    bad = ~spd & torch.isfinite(a).flatten(-2).all(-1)  # not positive definite (a NaN matrix is reported as such)
    bound = max(tol, torch.finfo(rhs.dtype).eps ** 0.5)
    rows = {"iterations": torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device), "residual": resid,
            "bad": bad}
    worst, ok, n_bad = torch.stack([resid.max().double(), (resid <= bound).all().double(), bad.sum().double()]).tolist()
    return v, CGInfo(0, worst, bool(ok), int(n_bad), rows)


def implicit_solve(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *,
                   implicit: str | Callable = "cg", cg_steps: int = 20, cg_tol: float = 1e-10,
                   v0: torch.Tensor | None = None, damping: float | None = None, lr: float | None = None,
                   steps: int | None = None, cg_hint: int | None = None) -> tuple[torch.Tensor, CGInfo]:
    """v ~ A^{-1} rhs on flat vectors, A = d2g/dy2 through `matvec`, by `implicit`:

    - "cg": `cg_steps` conjugate-gradient steps (stops at relative residual `cg_tol`), from `v0` if given;
    - "direct": the dense A solved exactly, for small y (`direct_solve`: at most `DIRECT_MAX` elements);
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
        return conjugate_gradient(matvec, rhs, cg_steps, cg_tol, x0=v0, hint=cg_hint)
    if implicit == "direct":
        return direct_solve(matvec, rhs, cg_tol)
    if implicit == "damped":
        return conjugate_gradient(lambda v: matvec(v) + damping * v, rhs, cg_steps, cg_tol, x0=v0, hint=cg_hint)
    return neumann_series(matvec, rhs, lr, steps)


def _check_implicit(implicit: str | Callable, damping: float | None, lr: float | None, steps: int | None) -> None:
    if callable(implicit):
        return
    if implicit not in IMPLICIT_METHODS:
        raise UsageError(f"implicit must be one of {', '.join(IMPLICIT_METHODS)} or a solve(matvec, b) callable "
                         f"(got {implicit!r})")
    # tensors (per-task values computed by the caller, e.g. the task-batched path) are not read here
    if implicit == "damped" and (damping is None or (not isinstance(damping, torch.Tensor) and not damping >= 0)):
        raise UsageError(f"implicit='damped' needs damping >= 0 (got {damping!r})")
    if implicit == "neumann" and (lr is None or steps is None or steps < 1
                                  or (not isinstance(lr, torch.Tensor) and not lr > 0)):
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
class HypergradientWarning(UserWarning):
    """`hypergradient` computed something that is not the hypergradient it promises (see its `check`)."""


class HypergradientError(UsageError):
    """`hypergradient(..., strict=True)` found a problem it would otherwise warn about."""


def default_inner_tol(dtype: torch.dtype) -> float:
    """`hypergradient`'s default bound on ||d_y g(x, y)|| / max(1, |g(x, y)|): 1e-4, or ten times
    `default_tol` where that is larger (float32: 3.5e-3), so that `solve_inner`'s defaults pass it."""
    return max(1e-4, 10 * default_tol(dtype))


#: the warning of each cause: fixed text, so that Python's warning registry shows each once per call site
WARNINGS = {
    "inner": "the inner gradient at y is not small: y is not an inner solution, so this is not the hypergradient",
    "solve": "the linear solve for v did not converge",
    "curvature": "d2g/dy2 is not positive definite at y (non-positive curvature)",
    "nonfinite": "a value is not finite (outer loss, v or the gradients)",
}


def _report(problems: dict[str, str], strict: bool) -> None:
    """Raise all `problems` as one line (strict), or warn each cause (fixed text, shown once per call site
    of `hypergradient` under Python's default warning filter; the numbers are in info.problems)."""
    if strict and problems:
        raise HypergradientError("hypergradient: " + "; ".join(problems.values()) + " (strict=True)")
    for cause in problems:
        warnings.warn(f"hypergradient: {WARNINGS[cause]} (details in info.problems; strict=True raises)",
                      HypergradientWarning, stacklevel=4)  # _report <- _check <- hypergradient <- the caller


@dataclass
class HypergradientInfo:
    """What `hypergradient` computed besides the gradient."""

    outer_loss: torch.Tensor  # f(x, y), detached (one value per task when batched)
    v: Any  # the linear system's solution, in y's structure (detached)
    solve: CGInfo  # its statistics: iterations, residual, converged, nonpositive_curvature, per-task rows
    inner: InnerSolveInfo | None = None  # what the inner solve reported, when passed in
    aux: Any = None  # f's auxiliary output (has_aux=True), e.g. the predictions
    inner_grad_norm: float = float("nan")  # ||d_y g(x, y)|| at the given y (largest over tasks; nan: check=False)
    problems: dict[str, str] = field(default_factory=dict)  # cause -> message: what `check` found on this call

    def stats(self) -> dict[str, float]:
        """Flat statistics: outer_loss (mean over tasks), cg_iterations, cg_residual, nonpositive_curvature,
        and the inner solve's."""
        out = {"outer_loss": float(self.outer_loss.mean()), "cg_iterations": float(self.solve.iterations),
               "cg_residual": self.solve.residual, "nonpositive_curvature": float(self.solve.nonpositive_curvature)}
        return {**out, **(self.inner.stats() if self.inner is not None else {})}


def hypergradient(g: Objective, f: Callable[[Any, Any, Any], Any], x: Any, y: Any, *,
                  inner_batch: Any = None, outer_batch: Any = None, implicit: str | Callable = "cg",
                  cg_steps: int = 20, cg_tol: float = 1e-10, v0: Any = None,
                  damping: float | None = None, lr: float | None = None, steps: int | None = None,
                  inner_info: InnerSolveInfo | None = None, has_aux: bool = False, batched: bool = False,
                  return_surrogate: bool = False, inner_tol: float | None = None, strict: bool = False,
                  check: bool = True, cg_hint: int | None = None) -> tuple[Any, HypergradientInfo]:
    """The implicit hypergradient of f(x, y*(x)) at an inner solution y (Algorithm 1, after the inner loop).

    With y constant: rhs = d_y f(x, y); v solves (d2g/dy2) v = rhs (x and the batches detached); the
    surrogate f(x, y) - <d_y g(x, y), v> (x and the batches attached) has x-gradient
    d_x f - (d2g/dx dy) v, the implicit-function-theorem hypergradient when d_y g(x, y) = 0.
    Memory does not depend on the number of inner or CG steps.

    Checks (`check=True`, one host synchronisation at the end): the result is not that hypergradient,
    and `hypergradient` warns (`HypergradientWarning`, one fixed text per cause, so that Python's default
    filter shows each once per call site; every call lists them with their numbers in `info.problems`) or, with `strict=True`, raises `HypergradientError` (one line),
    when: ||d_y g(x, y)|| > inner_tol * max(1, |g(x, y)|) (y is not an inner solution; per task); the
    linear solve did not converge: relative residual above max(cg_tol, `default_tol(dtype)`) ("cg",
    "damped", "direct", callable; the "neumann" series is truncated by design); it met non-positive curvature (d2g/dy2 not positive definite); or the outer loss, v or the
    gradients (the surrogate) are not finite. `check=False`: none of this (callers that truncate on purpose).

    Args:
        g: inner loss g(x, y, inner_batch) -> scalar.  f: outer loss f(x, y, outer_batch) -> scalar,
            or (scalar, aux) with `has_aux=True`.
        x: outer variables: any tree of tensors (dict, tuple, list, nested; gradients for those that
            require grad).
        y: the inner solution (a tree of tensors), e.g. from `solve_inner`; used as a constant.
        inner_batch, outer_batch: data for g and f (any tree; tensors in them may carry graph).
        implicit: "cg" | "direct" | "damped" | "neumann" | a torchopt-style `solve(matvec, b)`; see
            `implicit_solve` (`damping` for damped; `lr`, `steps` for neumann; "direct": small y only).
        cg_steps, cg_tol, v0: conjugate-gradient steps, relative tolerance, warm start (a tree like y, or flat).
        inner_info: the inner solve's report, carried into the returned info.
        batched: y holds a stack of tasks, g and f return one value per task (see the module docstring).
        return_surrogate: return the surrogate scalar (summed over tasks when batched) to backpropagate
            yourself (into x and anything attached in the batches) instead of the x-gradients.
        inner_tol: the bound on the inner gradient (default `default_inner_tol(dtype)`: 1e-4 in float64).
        strict: raise instead of warning.  check: run the checks at all.
        cg_hint: CG's expected iterations: its host reads start there (`conjugate_gradient`'s `hint`).

    Returns:
        (grads, info): grads in x's structure -- a flat dict x: a dict over its entries that require grad;
        any other tree: the same tree, None where a tensor does not require grad -- (summed over tasks
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
        >>> grads["s"], info.solve.converged, info.problems
        (tensor(1.5000, dtype=torch.float64), True, {})
    """
    xs, yd = pytree.leaf_dict(x), detached(pytree.leaf_dict(y))
    if not yd:
        raise UsageError("y must hold tensors (the inner solution: a dict, tuple or list of tensors)")
    _check_implicit(implicit, damping, lr, steps)
    if batched and callable(implicit):
        raise UsageError("a solve(matvec, b) callable would solve the stacked tasks as one system: with batched=True "
                         "use implicit='cg' (one solve per task), or call hypergradient per task")
    names = [k for k, t in xs.items() if t.requires_grad]
    if not return_surrogate and not names:
        raise UsageError("hypergradient: no tensor of x requires grad, so there is nothing to differentiate: "
                         "call .requires_grad_() on the outer variables (or pass return_surrogate=True)")
    g, f = _on_leaf_dicts(g, x, y), _on_leaf_dicts(f, x, y)
    x_d, inner_d, outer_d = detached(xs), detach(inner_batch), detach(outer_batch)
    rhs = outer_gradient(f, x_d, yd, outer_d, batched=batched, has_aux=has_aux)
    if v0 is not None and not (isinstance(v0, torch.Tensor) and v0.shape == rhs.shape):
        v0 = flatten(detached(pytree.leaf_dict(v0)), batched)
    yr, g_value, d_y_g = _inner_grad_graph(g, x_d, yd, inner_d, batched)
    v, solve_info = implicit_solve(_matvec(yr, d_y_g, batched), rhs, implicit=implicit, cg_steps=cg_steps,
                                   cg_tol=cg_tol, v0=v0, damping=damping, lr=lr, steps=steps, cg_hint=cg_hint)
    with torch.enable_grad():
        mixed = mixed_term(g, xs, yd, v, inner_batch, batched=batched)
        out = f(xs, yd, outer_batch)
        value, aux = out if has_aux else (out, None)
        surrogate = (value - mixed).sum()
    v_tree = unflatten(v, yd, batched)
    info = HypergradientInfo(value.detach(), v_tree if pytree.is_flat_dict(y) else pytree.rebuild(y, v_tree.values()),
                             solve_info, inner_info, aux)
    if return_surrogate:
        result, finite = surrogate, torch.isfinite(surrogate.detach())
    else:
        if surrogate.requires_grad:
            found = torch.autograd.grad(surrogate, [xs[k] for k in names], allow_unused=True)
        else:
            found = (None,) * len(names)
        grads = {k: torch.zeros_like(xs[k]) if gr is None else gr for k, gr in zip(names, found)}
        finite = torch.stack([torch.isfinite(t).all() for t in grads.values()]).all()
        result = grads if pytree.is_flat_dict(x) else pytree.rebuild(x, [grads.get(k) for k in xs])
    if check:
        _check(info, d_y_g, g_value, v, finite, implicit, inner_tol, cg_tol, batched, strict)
    return result, info


def _check(info: HypergradientInfo, d_y_g: tuple[torch.Tensor, ...], g_value: torch.Tensor, v: torch.Tensor,
           finite: torch.Tensor, implicit: str | Callable, inner_tol: float | None, cg_tol: float, batched: bool,
           strict: bool) -> None:
    """`hypergradient`'s checks, read in one host synchronisation; sets info.inner_grad_norm, info.problems."""
    grad = flatten({str(i): t.detach() for i, t in enumerate(d_y_g)}, batched)
    tol = default_inner_tol(grad.dtype) if inner_tol is None else inner_tol
    norm = grad.norm(dim=-1).to(torch.float64)
    ratio = norm / g_value.detach().abs().to(torch.float64).clamp_min(1.0)
    flags = torch.stack([norm.max(), ratio.max(), torch.isfinite(info.outer_loss).all().to(torch.float64),
                         torch.isfinite(v).all().to(torch.float64), finite.to(torch.float64)])
    norm_max, ratio_max, loss_ok, v_ok, grads_ok = flags.tolist()
    info.inner_grad_norm = norm_max
    problems = {}
    if not ratio_max <= tol:
        problems["inner"] = (f"the inner gradient ||d_y g(x, y)|| = {norm_max:.3g} exceeds inner_tol * max(1, |g|) "
                             f"(inner_tol={tol:g}): y is not an inner solution, so this is not the hypergradient; "
                             "solve the inner problem further (solve_inner's defaults solve to tolerance)")
    solve = info.solve
    bound = max(cg_tol, default_tol(grad.dtype))
    if implicit != "neumann" and not solve.residual <= bound and not solve.nonpositive_curvature:
        problems["solve"] = (f"the linear solve did not converge (relative residual {solve.residual:.3g} > {bound:.3g} "
                             f"after {solve.iterations} iterations): raise cg_steps, or use implicit='direct'")
    if solve.nonpositive_curvature:
        problems["curvature"] = (f"d2g/dy2 is not positive definite at y ({solve.nonpositive_curvature} task(s)): "
                                 "y is not a strict minimum of g; solve the inner problem, or regularise g")
    bad = [name for name, ok in (("the outer loss", loss_ok), ("v", v_ok), ("the gradients", grads_ok)) if not ok]
    if bad:
        problems["nonfinite"] = f"not finite: {', '.join(bad)}; check x, y and the batches for NaN or inf"
    info.problems = problems
    _report(problems, strict)
