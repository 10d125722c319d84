"""Linear solves on Hessian-vector products: conjugate gradient, batched over tasks.

Used by every implicit algorithm (`mrml`, `imaml`): solve A v = b where only the product A p is
available. Vectors are flat, with optional leading batch dimensions; each batch row is solved
independently, and rows stop updating once their residual is below tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CGInfo:
    """Solver statistics: iterations run, final relative residual ||r||/||b|| (largest over the batch), whether all
    rows converged, and how many rows met non-positive curvature (their solve stopped there)."""

    iterations: int
    residual: float
    converged: bool
    nonpositive_curvature: int
    rows: dict[str, torch.Tensor]  # per batch row: iterations, residual, bad (curvature)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    max_iter: int = 20,
    tol: float = 1e-10,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CGInfo]:
    """Approximately solve `matvec(x) = b` (A symmetric positive definite) in at most `max_iter` steps.

    Stops a row when ||r|| <= tol * max(||b||, tiny). A direction with p'Ap <= 0 means A is not
    positive definite there: that row keeps its current iterate and is reported, never divided by.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    bnorm = b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    active = rs.sqrt() > tol * bnorm
    bad = torch.zeros_like(active)
    iters = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    it = 0
    while it < max_iter and bool(active.any()):
        iters += active.squeeze(-1).long()
        ap = matvec(p)
        pap = (p * ap).sum(-1, keepdim=True)
        curv_ok = pap > torch.finfo(b.dtype).eps * (p * p).sum(-1, keepdim=True)
        bad = bad | (active & ~curv_ok)
        active = active & curv_ok
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
    converged = not bool(active.any()) and not bool(bad.any())
    return x, CGInfo(it, float(row_residual.max()), converged, int(bad.sum()), rows)


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
    return v, CGInfo(terms, float(resid.max()), False, 0, rows)
