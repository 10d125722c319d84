"""Ridge-regression meta-learning with closed forms, for checking the theory (benchmarks/theory.py).

Task i: support (A_s, b_s), query (A_q, b_q); features Z = A x with x (d x p) the outer variable,
inner y in R^p. Inner loss g = mean((Z_s y - b_s)^2) + lam/2 ||y||^2, outer loss f = mean((Z_q y - b_q)^2),
so y*(x) = (2 Z_s'Z_s/n + lam I)^{-1} 2 Z_s'b_s/n and Phi(x) = mean_i f_i(x, y_i*(x)).

The same problem as an mrml model: `ridge_model` is Linear(d, p) (weight = x^T, the outer part)
then Linear(p, 1) (weight = y^T, the inner part "1", initialised at zero), with the regression loss;
`AlgoConfig(inner="1", l2=lam)`. Everything is float64 and batched over tasks (all tasks of a set
share their sizes), so the exact hypergradient of a pool of hundreds of tasks costs one solve.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data.base import Episode


@dataclass
class RidgeTasks:
    """A set of ridge tasks, stacked: support_x (T, n, d), support_y (T, n), query_x (T, m, d), query_y (T, m)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def episodes(self, indices: list[int] | None = None) -> list[Episode]:
        idx = range(len(self)) if indices is None else indices
        return [Episode(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i]) for i in idx]

    def subset(self, indices: list[int] | torch.Tensor) -> "RidgeTasks":
        i = torch.as_tensor(indices, dtype=torch.long)
        return RidgeTasks(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])


def ridge_tasks(n_tasks: int, d: int = 6, n: int = 20, m: int = 15, seed: int = 0, spread: float = 0.5,
                noise: float = 0.1) -> RidgeTasks:
    """Tasks from one distribution: regression weights w = w_0 + spread * N(0, I) around a shared w_0,
    Gaussian inputs, label noise `noise`. The same seed gives the same tasks."""
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "dtype": torch.float64}
    w0 = torch.randn(d, **kw)
    w = w0 + spread * torch.randn(n_tasks, d, **kw)
    a_s = torch.randn(n_tasks, n, d, **kw)
    a_q = torch.randn(n_tasks, m, d, **kw)
    b_s = torch.einsum("tnd,td->tn", a_s, w) + noise * torch.randn(n_tasks, n, **kw)
    b_q = torch.einsum("tmd,td->tm", a_q, w) + noise * torch.randn(n_tasks, m, **kw)
    return RidgeTasks(a_s, b_s, a_q, b_q)


def ridge_model(d: int = 6, p: int = 4, seed: int = 0, scale: float | None = None) -> nn.Sequential:
    """Linear(d, p) (outer, x = weight^T; default init, or N(0, scale^2) entries) then Linear(p, 1) at zero (inner)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, p, bias=False), nn.Linear(p, 1, bias=False)).double()
    if scale is not None:
        nn.init.normal_(model[0].weight, std=scale)
    nn.init.zeros_(model[1].weight)
    return model


def outer_variable(model: nn.Sequential) -> torch.Tensor:
    """x (d x p) of a `ridge_model`, detached."""
    return model[0].weight.detach().T


def inner_hessian(x: torch.Tensor, tasks: RidgeTasks, lam: float) -> torch.Tensor:
    """d2g/dy2 of every task, (T, p, p)."""
    z = tasks.support_x @ x
    n, p = z.shape[-2], z.shape[-1]
    return 2 * z.transpose(-1, -2) @ z / n + lam * torch.eye(p, dtype=z.dtype)


def inner_solution(x: torch.Tensor, tasks: RidgeTasks, lam: float) -> torch.Tensor:
    """y_i*(x) for every task, (T, p)."""
    z = tasks.support_x @ x
    rhs = 2 * (z.transpose(-1, -2) @ tasks.support_y.unsqueeze(-1)) / z.shape[-2]
    return torch.linalg.solve(inner_hessian(x, tasks, lam), rhs).squeeze(-1)


def outer_objective(x: torch.Tensor, tasks: RidgeTasks, lam: float, mu: float = 0.0) -> torch.Tensor:
    """Phi(x) + mu/2 ||x||^2."""
    y = inner_solution(x, tasks, lam)
    pred = ((tasks.query_x @ x) @ y.unsqueeze(-1)).squeeze(-1)
    phi = ((pred - tasks.query_y) ** 2).mean()
    return phi + 0.5 * mu * (x * x).sum() if mu else phi


def true_hypergradient(x: torch.Tensor, tasks: RidgeTasks, lam: float, mu: float = 0.0) -> torch.Tensor:
    """d(Phi + mu/2||x||^2)/dx (d x p), by autograd through the closed-form inner solutions."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(outer_objective(x, tasks, lam, mu), x)
    return grad
