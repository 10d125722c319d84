"""Exactness of Algorithm 1 in float64 against closed forms and finite differences."""
from __future__ import annotations

import torch

from mrml.algorithms import MRML, AlgoConfig
from mrml.implicit import conjugate_gradient
from ridge import ridge_model, ridge_tasks, true_hypergradient

LAM = 0.5


def mrml_for(model, **kw) -> MRML:
    cfg = AlgoConfig(inner="1", l2=LAM, inner_lr=0.1, inner_steps=kw.pop("inner_steps", 400), cg_steps=kw.pop("cg_steps", 10),
                     inner_solver="gd", implicit="cg", **kw)  # Algorithm 1 as written
    return MRML(model, "regression", cfg)


def test_exact_cg_solves_spd_system():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(3, 30, generator=g, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: v @ a, b, max_iter=200, tol=1e-13)
    assert info.converged and info.nonpositive_curvature == 0
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-9, atol=1e-11)


def test_exact_cg_reports_nonpositive_curvature():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    x, info = conjugate_gradient(lambda v: v @ a, torch.ones(3, dtype=torch.float64), max_iter=10)
    assert info.nonpositive_curvature == 1 and not info.converged
    assert torch.isfinite(x).all()


def test_exact_hypergradient_matches_closed_form():
    tasks = ridge_tasks(4)
    model = ridge_model()
    algo = mrml_for(model)
    algo.meta_gradient(tasks)
    x = model[0].weight.detach().T  # features Z = A x with x = W^T
    ref = true_hypergradient(x, tasks, LAM).T
    rel = (model[0].weight.grad - ref).norm() / ref.norm()
    assert rel < 1e-8, float(rel)
    assert model[1].weight.grad is None  # the head init is not an outer variable here


def test_exact_deterministic_gd_reaches_stationary_point():
    """Full-batch outer gradient descent on Phi(x) + mu/2||x||^2 with K=5 and N=4 fixed reaches the
    closed-form stationary point, with each task's y and v warm-started across outer iterations.
    (Without mu, Phi keeps decreasing as the features grow against the ridge term: no stationary point.)"""
    tasks, mu = ridge_tasks(5, seed=3), 0.3
    model = ridge_model(seed=3)
    algo = mrml_for(model, inner_steps=5, cg_steps=4, warm_start=True)
    opt = torch.optim.SGD(algo.outer_parameters(), lr=0.3, weight_decay=mu)
    ids = list(range(len(tasks)))

    def true_norm() -> float:
        x = model[0].weight.detach().T
        return float((true_hypergradient(x, tasks, LAM) + mu * x).norm())

    norms = [true_norm()]
    for _ in range(600):
        algo.meta_gradient(tasks, task_ids=ids)
        opt.step()
        norms.append(true_norm())
        if norms[-1] < 1e-7:
            break
    assert norms[0] > 0.5
    assert norms[-1] < 1e-6, norms[-1]
