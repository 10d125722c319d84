"""Linear solves on Hessian-vector products: conjugate gradient, batched over tasks.

Used by every implicit algorithm (`mrml`, `imaml`): solve A v = b where only the product A p is
available. Vectors are flat, with optional leading batch dimensions; each batch row is solved
independently, and rows stop updating once their residual is below tolerance.

`cg_solver()` wraps the solver in the `solve(matvec, b)` form that torchopt's `custom_root(...,
solve=...)` (and jaxopt's) takes: b and the solution are tensor trees (a tensor, or dicts, lists and
tuples of tensors).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import UsageError
from .pytree import flatten, leaves, unflatten


class CGInfo:
    """Solver statistics: iterations run, final relative residual ||r||/||b|| (largest over the batch), whether all
    rows converged, and how many rows met non-positive curvature (their solve stopped there); `rows` holds the
    per-row tensors (iterations, residual, bad). The four summaries may be given as tensors: each is read on
    the host only when first asked for (a solver that returns one costs no synchronisation until then)."""

    __slots__ = ("_values", "rows")
    _FIELDS = {"iterations": int, "residual": float, "converged": bool, "nonpositive_curvature": int}

    def __init__(self, iterations: int | torch.Tensor, residual: float | torch.Tensor, converged: bool | torch.Tensor,
                 nonpositive_curvature: int | torch.Tensor, rows: dict[str, torch.Tensor]):
        self._values: dict[str, Any] = {"iterations": iterations, "residual": residual, "converged": converged,
                                        "nonpositive_curvature": nonpositive_curvature}
        self.rows = rows  # per batch row: iterations, residual, bad (curvature)

    def _get(self, name: str) -> Any:
        value = self._values[name]
        if isinstance(value, torch.Tensor):  # the host read, once
            value = self._values[name] = self._FIELDS[name](value)
        return value

    iterations = property(lambda self: self._get("iterations"))
    residual = property(lambda self: self._get("residual"))
    converged = property(lambda self: self._get("converged"))
    nonpositive_curvature = property(lambda self: self._get("nonpositive_curvature"))

    def __repr__(self) -> str:
        return (f"CGInfo(iterations={self.iterations}, residual={self.residual}, converged={self.converged}, "
                f"nonpositive_curvature={self.nonpositive_curvature})")


class IterationHint:
    """Where the next solve's host checks start (`conjugate_gradient`'s `hint`), from the iterations the last
    solves needed (`push` one solve's most, get the new hint): the most of the last `window`, but at most
    `margin` above the last one. Counts that wander by an iteration or two from solve to solve then cost
    one check, not two or three; a solve needing fewer iterations runs the extra ones masked (no result
    changes, at most `margin` products more after a long solve, e.g. the first of a warm start).

    Example:
        >>> h = IterationHint(window=3, margin=2)
        >>> [h.push(c) for c in (9, 12, 10, 8, 60, 2, 3)]
        [9, 12, 12, 10, 60, 4, 5]
    """

    def __init__(self, window: int = 8, margin: int = 2):
        self._recent: deque[int] = deque(maxlen=window)
        self.margin = margin

    def push(self, count: int) -> int:
        self._recent.append(int(count))
        return min(max(self._recent), int(count) + self.margin)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    max_iter: int = 20,
    tol: float = 1e-10,
    x0: torch.Tensor | None = None,
    hint: int | None = None,
) -> tuple[torch.Tensor, CGInfo]:
    """Approximately solve `matvec(x) = b` (A symmetric positive definite) in at most `max_iter` steps.

    Stops a row when ||r|| <= tol * max(||b||, tiny). A direction with p'Ap <= 0 means A is not
    positive definite there: that row keeps its current iterate and is reported, never divided by.
    A row whose b, residual or p'Ap is not finite (NaN or inf in b or from `matvec`) stops too and is
    not converged: `converged` is True only when every row's relative residual is finite and <= tol.

    Args:
        matvec: v -> A v on flat vectors (with the leading batch dimensions of `b`, row by row).
        b: right-hand side, (n,) or (..., n) rows solved independently.
        max_iter: most CG steps.  tol: relative residual at which a row stops (finite, >= 0).
        x0: starting point.
        hint: the iterations expected (e.g. the last solve's most): whether any row is still active is
            read on the host at iterations hint, hint + 1, hint + 3, hint + 7, ... only, finished rows
            masked in between (one or two reads when the hint is right); None: every iteration.

    Returns:
        (x, info): the solution shaped as b, and `CGInfo` (iterations, worst relative residual -- NaN when a
        row's is --, ...).

    Raises:
        UsageError: tol not a finite number >= 0.

    Example:
        >>> import torch
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> x, info.iterations, info.converged
        (tensor([0.0909, 0.6364], dtype=torch.float64), 2, True)
    """
    try:
        ok = not isinstance(tol, bool) and math.isfinite(float(tol)) and float(tol) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"conjugate gradient: tol must be a finite number >= 0 (got {tol!r})")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    bnorm = b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    active = rs.sqrt() > tol * bnorm
    bad = torch.zeros_like(active)
    iters = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    it = 0
    checks = None if hint is None else {max(hint, 0) + 2**j - 1 for j in range(max(max_iter, 1).bit_length() + 1)}
    while it < max_iter and ((checks is not None and it not in checks) or bool(active.any())):
        iters += active.squeeze(-1).long()
        ap = matvec(p)
        pap = (p * ap).sum(-1, keepdim=True)
        curv_ok = pap > torch.finfo(b.dtype).eps * (p * p).sum(-1, keepdim=True)
        finite = torch.isfinite(pap)  # a NaN/inf product stops the row (not converged), not a curvature report
        bad = bad | (active & ~curv_ok & finite)
        active = active & curv_ok & finite
        alpha = torch.where(active, rs / torch.where(curv_ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(-1, keepdim=True)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(active, r + beta * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > tol * bnorm)
        it += 1
    row_residual = (rs.sqrt() / bnorm).squeeze(-1)
    rows = {"iterations": iters, "residual": row_residual, "bad": bad.squeeze(-1)}
    done = torch.isfinite(rs) & (rs.sqrt() <= tol * bnorm)  # False for NaN rows, which stop without converging
    converged = done.all() & ~bad.any()
    return x, CGInfo(iters.max() if checks is not None else it, row_residual.max(), converged, bad.sum(), rows)


def neumann_series(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, alpha: float,
                   terms: int) -> tuple[torch.Tensor, CGInfo]:
    """v = alpha sum_{j<terms} (I - alpha A)^j b: the inverse of A as K gradient steps of size alpha see it
    (`terms` - 1 products with A). Reports the relative residual ||A v - b|| / ||b|| (one product more)."""
    v = torch.zeros_like(b)
    term = alpha * b
    for j in range(terms):
        v = v + term
        if j + 1 < terms:  # the next term; none is needed after the last
            term = term - alpha * matvec(term)
    bnorm = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    resid = (matvec(v) - b).norm(dim=-1) / bnorm
    iters = torch.full(b.shape[:-1], terms, dtype=torch.long, device=b.device)
    rows = {"iterations": iters, "residual": resid, "bad": torch.zeros_like(iters, dtype=torch.bool)}
    return v, CGInfo(terms, resid.max(), False, 0, rows)


def _flat_tree(tree: Any) -> torch.Tensor:
    """`flatten(tree)`, refusing a tree without tensors or with mixed dtypes (one line each)."""
    ts = leaves(tree)
    if not ts:
        raise UsageError("solve(matvec, b): b must be a tensor or a dict/list/tuple of tensors (got no tensor)")
    if len({t.dtype for t in ts}) > 1:
        dtypes = sorted({str(t.dtype) for t in ts})
        raise UsageError(f"solve(matvec, b): the tensors of b must share one dtype (got {dtypes})")
    return flatten(ts)


class CGSolve:
    """A `solve(matvec, b, *, ridge=None, init=None, is_sdp=None) -> x` over tensor trees by
    `conjugate_gradient` (see `cg_solver`). The last call's `CGInfo` is kept in `.info`."""

    def __init__(self, steps: int = 20, tol: float = 1e-10, ridge: float | None = None, init: Any = None,
                 is_sdp: bool = True):
        if not (isinstance(steps, int) and steps >= 1) or not (tol > 0 and math.isfinite(tol)):
            raise UsageError(f"cg_solver needs steps >= 1 and tol > 0 (got steps={steps!r}, tol={tol!r})")
        if ridge is not None and not ridge >= 0:
            raise UsageError(f"cg_solver: ridge must be >= 0 (got {ridge!r})")
        self.steps, self.tol, self.ridge, self.init, self.is_sdp = steps, tol, ridge, init, is_sdp
        self.info: CGInfo | None = None

    def __call__(self, matvec: Callable[[Any], Any], b: Any, *, ridge: float | None = None, init: Any = None,
                 is_sdp: bool | None = None) -> Any:
        ridge = self.ridge if ridge is None else ridge
        init = self.init if init is None else init
        is_sdp = self.is_sdp if is_sdp is None else is_sdp
        bf = _flat_tree(b)

        def flat_matvec(v: torch.Tensor) -> torch.Tensor:
            out = _flat_tree(matvec(unflatten(v, b))).to(v.dtype)
            return out + ridge * v if ridge else out

        x0 = _flat_tree(init).to(bf.dtype) if init is not None else None
        if is_sdp:
            x, self.info = conjugate_gradient(flat_matvec, bf, self.steps, self.tol, x0=x0)
        else:  # symmetric but possibly indefinite: CG on the normal equations A A x = A b
            x, self.info = conjugate_gradient(lambda v: flat_matvec(flat_matvec(v)), flat_matvec(bf), self.steps,
                                              self.tol, x0=x0)
        return unflatten(x, b)


def cg_solver(steps: int = 20, tol: float = 1e-10, *, ridge: float | None = None, init: Any = None,
              is_sdp: bool = True) -> CGSolve:
    """A linear solver `solve(matvec, b) -> x` in the form torchopt's `custom_root(optimality_fn, argnums,
    solve=...)` and its `linear_solve` functions use: `matvec` maps a tensor tree (tensor, or dict/list/
    tuple of tensors) to one of the same structure, b is such a tree, the solution comes back in b's
    structure. Solves (A + ridge I) x = b by at most `steps` conjugate-gradient steps (relative residual
    `tol`), from `init` (a tree like b) if given; `is_sdp=False`: A symmetric but not known to be
    positive definite, solved as A^2 x = A b. `ridge`, `init`, `is_sdp` may also be given per call.
    The last call's statistics are in `.info` (`CGInfo`).

    Args:
        steps: most CG steps.  tol: relative residual at which CG stops.
        ridge: optional ridge added to A.  init: optional starting point.  is_sdp: whether A is positive definite.

    Returns:
        A `CGSolve` callable.

    Example:
        >>> import torch
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> matvec = lambda t: {"u": a @ t["u"], "s": 3.0 * t["s"]}
        >>> solve = cg_solver(steps=10)
        >>> b = {"u": torch.tensor([3.0, 3.0], dtype=torch.float64), "s": torch.tensor(6.0, dtype=torch.float64)}
        >>> x = solve(matvec, b)
        >>> x["u"], x["s"], solve.info.converged
        (tensor([1., 1.], dtype=torch.float64), tensor(2., dtype=torch.float64), True)
    """
    return CGSolve(steps, tol, ridge, init, is_sdp)
