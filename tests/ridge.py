"""Meta-learning with linear-regression tasks: ridge regression on features x^T a (closed forms).

Task i: support (A_s, b_s), query (A_q, b_q). Features Z = A x (x: d x p, the outer variable),
inner y in R^p: g = mean((Z_s y - b_s)^2) + lam/2 ||y||^2, f = mean((Z_q y - b_q)^2).
y*(x) = (2 Z_s'Z_s/n + lam I)^{-1} 2 Z_s'b_s/n; Phi(x) = mean_i f_i(x, y_i*(x)).
"""
from __future__ import annotations

import torch
from torch import nn

from mrml.data.base import Episode


def ridge_tasks(n_tasks: int, d: int = 6, p: int = 4, n: int = 20, m: int = 15, seed: int = 0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    tasks = []
    for _ in range(n_tasks):
        w = w_true + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
        a_s = torch.randn(n, d, generator=g, dtype=torch.float64)
        a_q = torch.randn(m, d, generator=g, dtype=torch.float64)
        tasks.append(Episode(a_s, a_s @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
                             a_q, a_q @ w + 0.1 * torch.randn(m, generator=g, dtype=torch.float64)))
    return tasks


def ridge_model(d: int = 6, p: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, p, bias=False), nn.Linear(p, 1, bias=False)).double()
    nn.init.zeros_(model[1].weight)
    return model


def inner_solution(x: torch.Tensor, ep: Episode, lam: float) -> torch.Tensor:
    z = ep.support_x @ x
    n = z.shape[0]
    h = 2 * z.T @ z / n + lam * torch.eye(z.shape[1], dtype=z.dtype)
    return torch.linalg.solve(h, 2 * z.T @ ep.support_y / n)


def outer_objective(x: torch.Tensor, tasks: list[Episode], lam: float) -> torch.Tensor:
    total = 0
    for ep in tasks:
        y = inner_solution(x, ep, lam)
        total = total + ((ep.query_x @ x @ y - ep.query_y) ** 2).mean()
    return total / len(tasks)


def true_hypergradient(x: torch.Tensor, tasks: list[Episode], lam: float) -> torch.Tensor:
    """d Phi / d x by autograd through the closed-form inner solution (x is d x p)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(outer_objective(x, tasks, lam), x)
    return grad
