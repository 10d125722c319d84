"""The functional core (mrml.functional, mrml.implicit.cg_solver): exact hypergradients in float64 against
closed forms and the independent reference, the surrogate, batched tasks, torchopt-style solves on
tensor trees, and the classes (MRML per task and task-batched) equal to the functions they call."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mrml import cg_solver, hypergradient, solve_inner
from mrml.algorithms import MRML, AlgoConfig
from mrml.data.base import Episode
from mrml.errors import UsageError
from mrml.functional import (HypergradientError, HypergradientWarning, default_tol, descend, descend_tasks, flatten,
                             implicit_solve, inner_value_and_grad)
from mrml.reference import exact_hypergradient
from ridge import inner_solution, ridge_model, ridge_tasks, true_hypergradient

D64 = torch.float64
LAM = 0.5


# -- ridge regression: g = mean((A_s x y - b_s)^2) + lam/2 ||y||^2, f = mean((A_q x y - b_q)^2) ----------
def ridge_g(x, y, batch):
    a, b = batch
    return ((a @ x["x"] @ y["y"] - b) ** 2).mean() + 0.5 * LAM * y["y"].pow(2).sum()


def ridge_f(x, y, batch):
    a, b = batch
    return ((a @ x["x"] @ y["y"] - b) ** 2).mean()


def ridge_x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(6, 4, generator=g, dtype=D64).requires_grad_(True)}


@pytest.mark.parametrize("implicit", ["cg", "callable", "damped0"])
def test_hypergradient_equals_closed_form_at_exact_inner_solution(implicit):
    x, (ep,) = ridge_x(), ridge_tasks(1)
    y = {"y": inner_solution(x["x"].detach(), ep, LAM)}
    kw = {"cg": {}, "callable": {"implicit": cg_solver(steps=50, tol=1e-14)},
          "damped0": {"implicit": "damped", "damping": 0.0}}[implicit]
    grads, info = hypergradient(ridge_g, ridge_f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                outer_batch=(ep.query_x, ep.query_y), cg_steps=50, cg_tol=1e-14, **kw)
    ref = true_hypergradient(x["x"], [ep], LAM)
    torch.testing.assert_close(grads["x"], ref, rtol=1e-10, atol=1e-13)
    assert info.solve.residual < 1e-10 and info.solve.nonpositive_curvature == 0
    if implicit == "cg":  # warm start from the solution (a dict like y): nothing left to do
        _, warm = hypergradient(ridge_g, ridge_f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                outer_batch=(ep.query_x, ep.query_y), cg_steps=50, cg_tol=1e-9, v0=info.v)
        assert warm.solve.iterations == 0 and info.solve.iterations > 2
    assert float(info.outer_loss) == pytest.approx(float(ridge_f(x, y, (ep.query_x, ep.query_y))), rel=1e-14)
    assert set(info.stats()) >= {"outer_loss", "cg_iterations", "cg_residual", "nonpositive_curvature"}
    # a wrong v (one CG step) gives a different answer: the comparison can fail
    with pytest.warns(HypergradientWarning, match="did not converge"):
        bad, _ = hypergradient(ridge_g, ridge_f, x, y, inner_batch=(ep.support_x, ep.support_y),
                               outer_batch=(ep.query_x, ep.query_y), cg_steps=1)
    assert float((bad["x"] - ref).norm()) > 1e-3 * float(ref.norm())


def test_solve_inner_then_hypergradient_gd_and_newton():
    x, (ep,) = ridge_x(1), ridge_tasks(1, seed=1)
    batch_s, batch_q = (ep.support_x, ep.support_y), (ep.query_x, ep.query_y)
    y_star = inner_solution(x["x"].detach(), ep, LAM)
    ref = true_hypergradient(x["x"], [ep], LAM)
    for solver, kw in (("gd", {"steps": 3000, "lr": 0.01}), ("newton", {"steps": 50, "tol": 1e-13})):
        y, inner = solve_inner(ridge_g, x, {"y": torch.zeros(4, dtype=D64)}, batch_s, solver=solver, **kw)
        assert not y["y"].requires_grad and inner.solver == solver
        torch.testing.assert_close(y["y"], y_star, rtol=1e-9, atol=1e-11)
        assert inner.grad_norm < 1e-9
        grads, info = hypergradient(ridge_g, ridge_f, x, y, inner_batch=batch_s, outer_batch=batch_q,
                                    cg_steps=50, cg_tol=1e-14, inner_info=inner)
        torch.testing.assert_close(grads["x"], ref, rtol=1e-8, atol=1e-11)
        assert info.inner is inner and info.stats()["inner_grad_norm"] == inner.grad_norm


def small_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def class_episode(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(9, 5, generator=g, dtype=D64), torch.arange(9) % 3,
                   torch.randn(6, 5, generator=g, dtype=D64), torch.arange(6) % 3)


def test_hypergradient_equals_reference_on_a_network():
    """Cross-entropy on a linear head over a tanh trunk: the functional core, given the reference's y*,
    equals `mrml.reference.exact_hypergradient` (dense Hessian solve, nothing of mrml's solvers)."""
    model, ep, lam = small_classifier(), class_episode(), 0.3
    ref = exact_hypergradient(model, [ep], "classification", lam)
    trunk, head = model[:2], model[2]
    x = {n: p.detach().clone().requires_grad_(True) for n, p in trunk.named_parameters()}

    def g(x, y, batch):
        feats = functional_call(trunk, x, (batch[0],))
        pred = functional_call(head, y, (feats,))
        return nn.functional.cross_entropy(pred, batch[1]) + 0.5 * lam * sum(t.pow(2).sum() for t in y.values())

    def f(x, y, batch):
        return nn.functional.cross_entropy(functional_call(head, y, (functional_call(trunk, x, (batch[0],)),)), batch[1])

    y = {n.split(".", 1)[1]: t for n, t in ref.y_star[0].items()}
    grads, info = hypergradient(g, f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                outer_batch=(ep.query_x, ep.query_y), cg_steps=100, cg_tol=1e-14)
    for n in x:
        torch.testing.assert_close(grads[n], ref.grads[n], rtol=1e-9, atol=1e-12)
    assert float(info.outer_loss) == pytest.approx(ref.phi, rel=1e-12)


def test_surrogate_backward_equals_returned_grads():
    x, (ep,) = ridge_x(2), ridge_tasks(1, seed=2)
    y, _ = solve_inner(ridge_g, x, {"y": torch.zeros(4, dtype=D64)}, (ep.support_x, ep.support_y), solver="gd",
                       steps=5, lr=0.05)
    kw = dict(inner_batch=(ep.support_x, ep.support_y), outer_batch=(ep.query_x, ep.query_y), cg_steps=4, check=False)
    grads, _ = hypergradient(ridge_g, ridge_f, x, y, **kw)
    surrogate, info = hypergradient(ridge_g, ridge_f, x, y, return_surrogate=True, **kw)
    assert surrogate.dim() == 0
    surrogate.backward()
    torch.testing.assert_close(x["x"].grad, grads["x"], rtol=1e-13, atol=1e-15)
    # the surrogate's value is f(x, y) - <d_y g(x, y), v>
    v = info.v["y"]
    yr = {"y": y["y"].clone().requires_grad_(True)}
    (gy,) = torch.autograd.grad(ridge_g(x, yr, kw["inner_batch"]), yr["y"])
    assert float(surrogate) == pytest.approx(float(info.outer_loss - (gy * v).sum()), rel=1e-12)


def test_batched_tasks_equal_per_task():
    """batched=True: stacked tasks, one value per task from g and f; the same y, step sizes (the guard
    halves a too-large step per task), v and summed hypergradient as task by task."""
    x, tasks = ridge_x(3), ridge_tasks(3, seed=3)
    lr, k = 0.6, 6  # large enough that the guard acts on some tasks

    def stacked(fn):
        def batched(x, y, batch):
            return torch.stack([fn(x, {"y": y["y"][c]}, (batch[0][c], batch[1][c])) for c in range(y["y"].shape[0])])
        return batched

    sb = (torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks]))
    qb = (torch.stack([t.query_x for t in tasks]), torch.stack([t.query_y for t in tasks]))
    y0 = {"y": torch.zeros(3, 4, dtype=D64)}
    yb, inner = solve_inner(stacked(ridge_g), x, y0, sb, solver="gd", steps=k, lr=lr, batched=True)
    grads_b, info_b = hypergradient(stacked(ridge_g), stacked(ridge_f), x, yb, inner_batch=sb, outer_batch=qb,
                                    cg_steps=30, cg_tol=1e-13, batched=True, check=False)
    total = torch.zeros_like(x["x"])
    lrs = []
    for c, ep in enumerate(tasks):
        y, one = solve_inner(ridge_g, x, {"y": torch.zeros(4, dtype=D64)}, (ep.support_x, ep.support_y), solver="gd",
                             steps=k, lr=lr)
        lrs.append(one.lr)
        torch.testing.assert_close(yb["y"][c], y["y"], rtol=1e-12, atol=1e-14)
        grads, info = hypergradient(ridge_g, ridge_f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                    outer_batch=(ep.query_x, ep.query_y), cg_steps=30, cg_tol=1e-13, check=False)
        torch.testing.assert_close(info_b.v["y"][c], info.v["y"], rtol=1e-10, atol=1e-13)
        total += grads["x"]
    assert inner.rows["lr"].tolist() == lrs and min(lrs) < lr  # the guard acted, decided per task
    torch.testing.assert_close(grads_b["x"], total, rtol=1e-10, atol=1e-13)
    assert info_b.outer_loss.shape == (3,)


def test_descend_tasks_takes_descend_decisions():
    """The masked guard over a stack of one task takes the same steps as the per-task guard."""
    (ep,) = ridge_tasks(1, seed=4)
    x = ridge_x(4)
    vg = inner_value_and_grad(ridge_g, {"x": x["x"].detach()}, (ep.support_x, ep.support_y))
    y, lr = descend(vg, {"y": torch.zeros(4, dtype=D64)}, 7, 0.8)

    def vg1(y):
        value, grads = vg({"y": y["y"][0]})
        return value.unsqueeze(0), tuple(t.unsqueeze(0) for t in grads)

    yb, lr_t = descend_tasks(vg1, {"y": torch.zeros(1, 4, dtype=D64)}, 7, 0.8)
    assert lr < 0.8 and float(lr_t[0]) == lr
    torch.testing.assert_close(yb["y"][0], y["y"], rtol=0, atol=0)


# -- torchopt-style solve(matvec, b) on tensor trees ------------------------------------------------------
def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=D64), g


def test_cg_solver_on_trees_against_dense_solve():
    a, g = spd(7, 0)
    b_flat = torch.randn(7, generator=g, dtype=D64)

    def to_tree(v):
        return {"w": v[:6].reshape(2, 3), "rest": (v[6:],)}

    def from_tree(t):
        return torch.cat([t["w"].reshape(-1), t["rest"][0]])

    def matvec(t):
        return to_tree(a @ from_tree(t))

    dense = torch.linalg.solve(a, b_flat)
    solve = cg_solver(steps=50, tol=1e-14)
    x = solve(matvec, to_tree(b_flat))
    assert isinstance(x, dict) and isinstance(x["rest"], tuple) and x["w"].shape == (2, 3)
    torch.testing.assert_close(from_tree(x), dense, rtol=1e-10, atol=1e-12)
    assert solve.info.converged
    # ridge, init (a tree like b), a plain tensor b, a tuple b
    x = cg_solver(steps=50, tol=1e-14, ridge=0.7)(matvec, to_tree(b_flat), init=to_tree(dense))
    torch.testing.assert_close(from_tree(x), torch.linalg.solve(a + 0.7 * torch.eye(7, dtype=D64), b_flat),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solve(lambda v: a @ v, b_flat), dense, rtol=1e-10, atol=1e-12)
    xt = solve(lambda t: tuple(a @ v for v in t), (b_flat, 2 * b_flat))
    assert isinstance(xt, tuple) and len(xt) == 2
    torch.testing.assert_close(xt[1], 2 * dense, rtol=1e-10, atol=1e-12)
    # two CG steps from zero are not the solution: the comparison can fail
    assert float((from_tree(cg_solver(steps=2)(matvec, to_tree(b_flat))) - dense).norm()) > 1e-3


def test_cg_solver_indefinite_and_bad_input():
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=D64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=D64)
    solve = cg_solver(steps=10)
    solve(lambda v: a @ v, b)
    assert solve.info.nonpositive_curvature == 1  # CG meets the negative direction and reports it
    x = solve(lambda v: a @ v, b, is_sdp=False)  # the normal equations A^2 x = A b
    torch.testing.assert_close(x, torch.tensor([0.5, -1.0, 1 / 3], dtype=D64), rtol=1e-10, atol=1e-12)
    with pytest.raises(UsageError, match="steps >= 1"):
        cg_solver(steps=0)
    with pytest.raises(UsageError, match="one dtype"):
        solve(lambda t: t, {"a": torch.ones(2), "b": torch.ones(2, dtype=D64)})
    with pytest.raises(UsageError, match="implicit must be one of"):
        hypergradient(ridge_g, ridge_f, ridge_x(), {"y": torch.zeros(4, dtype=D64)}, implicit="dense")
    with pytest.raises(UsageError, match="solver must be one of"):
        solve_inner(ridge_g, ridge_x(), {"y": torch.zeros(4, dtype=D64)}, None, solver="adam")


# -- the classes equal the functional core -----------------------------------------------------------------
def test_mrml_per_task_equals_functional_core():
    """MRML (Algorithm 1 as written: gd + cg) on the ridge model: .grad of the trunk equals
    `hypergradient` called by hand with g, f built from the model, y from `solve_inner`."""
    tasks, model = ridge_tasks(2, seed=5), ridge_model(seed=5)
    k, lr, n = 7, 0.1, 5
    algo = MRML(model, "regression", AlgoConfig(inner="1", l2=LAM, inner_lr=lr, inner_steps=k, cg_steps=n,
                                                 inner_solver="gd", implicit="cg"))
    stats = algo.meta_gradient(tasks)
    w = model[0].weight.detach().clone().requires_grad_(True)
    x = {"weight": w}
    y0 = {"weight": model[1].weight.detach().clone()}

    def g(x, y, batch):
        feats = batch[0] @ x["weight"].T
        return ((feats @ y["weight"].T).reshape(-1) - batch[1]).pow(2).mean() + 0.5 * LAM * y["weight"].pow(2).sum()

    def f(x, y, batch):
        return ((batch[0] @ x["weight"].T @ y["weight"].T).reshape(-1) - batch[1]).pow(2).mean()

    total, losses = torch.zeros_like(w), []
    for ep in tasks:
        y, inner = solve_inner(g, x, y0, (ep.support_x, ep.support_y), solver="gd", steps=k, lr=lr)
        grads, info = hypergradient(g, f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                    outer_batch=(ep.query_x, ep.query_y), cg_steps=n, check=False)
        total += grads["weight"] / len(tasks)
        losses.append(float(info.outer_loss))
    torch.testing.assert_close(model[0].weight.grad, total, rtol=1e-12, atol=1e-15)
    assert stats.loss == pytest.approx(sum(losses) / len(losses), rel=1e-13)
    assert float(total.norm()) > 1e-3


def test_mrml_direct_closed_forms_equal_functional_core():
    """The default form (exact Newton solve and `direct` closed forms of the head) gives the hypergradient
    the autograd pieces give at the same y."""
    model, ep = small_classifier(1), class_episode(1)
    algo = MRML(model, "classification", AlgoConfig(inner="2", l2=0.3, learn_l2=False, inner_tol=1e-13, inner_steps=50))
    assert algo.config.implicit == "direct" and algo.config.inner_solver == "newton"
    algo.meta_gradient([ep])
    trunk = model[:2]
    x = {n: p.detach().clone().requires_grad_(True) for n, p in trunk.named_parameters()}
    with torch.no_grad():
        fs = trunk(ep.support_x)
    y = algo.solve_inner({}, algo.split.inner_init(), fs, ep.support_y, 50, 0.1, None)
    g = lambda x, y, b: algo.inner_objective({}, y, (functional_call(trunk, x, (b[0],)), b[1], None, None))
    f = lambda x, y, b: algo.outer_objective({}, y, (functional_call(trunk, x, (b[0],)), b[1]))[0]
    grads, _ = hypergradient(g, f, x, y, inner_batch=(ep.support_x, ep.support_y),
                             outer_batch=(ep.query_x, ep.query_y), cg_steps=100, cg_tol=1e-14)
    for n, p in trunk.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2])
def test_accumulate_adds_to_grad(chunk):
    tasks = ridge_tasks(3, seed=6)
    grads = []
    for accumulate in (False, True):
        model = ridge_model(seed=6)
        algo = MRML(model, "regression", AlgoConfig(inner="1", l2=LAM, inner_steps=5, cg_steps=5, inner_solver="gd",
                                                     implicit="cg", task_chunk=chunk))
        algo.meta_gradient(tasks)
        algo.meta_gradient(tasks, accumulate=accumulate)
        assert (getattr(algo, "_task_batched", None) is not None) == (chunk > 1)
        grads.append(model[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], 2 * grads[0], rtol=1e-14, atol=0)


class DictInputNet(nn.Module):
    """A model taking dict inputs: no trunk to split off (inner part "all"), features stay a dict."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x):
        return (self.a(x["a"]) + torch.tanh(self.b(x["b"]))).sum(-1)


def test_dict_inputs_per_task_and_batched_agree():
    g = torch.Generator().manual_seed(7)

    def inputs(n):
        return {"a": torch.randn(n, 3, generator=g, dtype=D64), "b": torch.randn(n, 4, generator=g, dtype=D64)}

    tasks = [Episode(inputs(6), torch.randn(6, generator=g, dtype=D64), inputs(5), torch.randn(5, generator=g, dtype=D64))
             for _ in range(3)]
    out = []
    for chunk in (1, 3):
        torch.manual_seed(0)
        model = DictInputNet().double()
        algo = MRML(model, "regression", AlgoConfig(inner="all", prox=True, l2=1.0, inner_steps=4, cg_steps=10, cg_tol=1e-13,
                                                     inner_solver="gd", implicit="cg", task_chunk=chunk))
        stats = algo.meta_gradient(tasks)
        out.append((flatten({n: p.grad for n, p in model.named_parameters()}), stats.loss))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-8, atol=1e-11)  # CG stops near 1e-13: rounding
    assert out[1][1] == pytest.approx(out[0][1], rel=1e-12) and float(out[0][0].norm()) > 1e-3


def test_a_solve_callable_is_refused_for_stacked_tasks():
    """One callable solve over (T, n) rows would couple the tasks' CG steps: refused, not silently wrong."""
    g = lambda x, y, a: 0.5 * ((y["w"] - x["s"] * a) ** 2).sum(-1) + 0.5 * (y["w"] ** 2).sum(-1)  # noqa: E731
    f = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum(-1)  # noqa: E731
    x = {"s": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}
    a = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(UsageError, match="batched=True use implicit='cg'"):
        hypergradient(g, f, x, {"w": a}, inner_batch=a, outer_batch=a, implicit=cg_solver(), batched=True)
    grads, info = hypergradient(g, f, x, {"w": x["s"].detach() * a / 2}, inner_batch=a, outer_batch=a, batched=True)
    assert info.solve.converged and grads["s"].shape == ()


# -- right by default: non-quadratic inner losses, checks, trees, the direct solve ------------------------------
def logistic_problem(seed=0, n=40, d=5):
    """Logistic regression, x = a log-penalty per feature: g = mean softplus(-s A w) + 1/2 sum e^x w^2."""
    gen = torch.Generator().manual_seed(seed)
    a, av = torch.randn(n, d, generator=gen, dtype=D64), torch.randn(n, d, generator=gen, dtype=D64)
    w_true = torch.randn(d, generator=gen, dtype=D64)
    s, sv = torch.sign(a @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=D64)), torch.sign(av @ w_true)

    def g(x, y, batch):
        return nn.functional.softplus(-batch[1] * (batch[0] @ y["w"])).mean() + 0.5 * (x["log_pen"].exp() * y["w"] ** 2).sum()

    def f(x, y, batch):
        return nn.functional.softplus(-batch[1] * (batch[0] @ y["w"])).mean()

    x = {"log_pen": torch.linspace(-3.0, -1.0, d, dtype=D64).requires_grad_(True)}
    return g, f, x, {"w": torch.zeros(d, dtype=D64)}, (a, s), (av, sv)


def tanh_mlp_problem(seed=0, n=30, d=4, h=5):
    """A small tanh MLP regressor, x = a log-penalty per input feature on the first layer's columns."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=gen, dtype=D64), torch.randn(n, generator=gen, dtype=D64)
    av, bv = torch.randn(n, d, generator=gen, dtype=D64), torch.randn(n, generator=gen, dtype=D64)

    def net(y, a):
        return torch.tanh(a @ y["W1"].T + y["b1"]) @ y["w2"]

    def g(x, y, batch):
        penalty = (x["log_pen"].exp() * y["W1"] ** 2).sum() + 0.1 * (y["b1"] ** 2).sum() + 0.1 * (y["w2"] ** 2).sum()
        return 0.5 * (net(y, batch[0]) - batch[1]).pow(2).mean() + 0.5 * penalty

    def f(x, y, batch):
        return 0.5 * (net(y, batch[0]) - batch[1]).pow(2).mean()

    x = {"log_pen": torch.full((d,), -1.0, dtype=D64).requires_grad_(True)}
    y0 = {"W1": 0.5 * torch.randn(h, d, generator=gen, dtype=D64), "b1": torch.zeros(h, dtype=D64),
          "w2": 0.5 * torch.randn(h, generator=gen, dtype=D64)}
    return g, f, x, y0, (a, b), (av, bv)


def reference_newton(g, x, y, batch, tol=1e-12):
    """An independent inner solve: plain Newton steps with the dense Hessian from torch.autograd.functional,
    to ||d_y g|| <= tol (asserted)."""
    names, shapes = list(y), [t.shape for t in y.values()]
    sizes = [t.numel() for t in y.values()]
    xd = {k: t.detach() for k, t in x.items()}

    def obj(v):
        return g(xd, {k: p.reshape(s) for k, p, s in zip(names, v.split(sizes), shapes)}, batch)

    v = torch.cat([t.detach().reshape(-1) for t in y.values()])
    for _ in range(50):
        grad = torch.autograd.functional.jacobian(obj, v)
        if float(grad.norm()) <= tol:
            break
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(obj, v), grad)
    assert float(torch.autograd.functional.jacobian(obj, v).norm()) <= tol
    return {k: p.reshape(s) for k, p, s in zip(names, v.split(sizes), shapes)}


def test_solve_inner_defaults_solve_to_tolerance():
    """Defaults: Newton-CG to default_tol (1.5e-8 in float64, relative to max(1, ||d_y g(y0)||)) on a tanh MLP,
    where 20 gd steps of 0.1 (the old defaults, still `solver="gd"`) leave the gradient far from zero."""
    g, _, x, y0, batch, _ = tanh_mlp_problem()
    y, info = solve_inner(g, x, y0, batch)
    assert info.solver == "newton" and info.converged and not (info.capped or info.stalled or info.floor)
    g0 = float(flatten(dict(zip(y0, inner_value_and_grad(g, x, batch)(y0)[1]))).norm())
    measured = float(flatten(dict(zip(y, inner_value_and_grad(g, x, batch)(y)[1]))).norm())
    assert measured == pytest.approx(info.grad_norm, rel=1e-12)
    assert measured <= default_tol(D64) * max(1.0, g0) and default_tol(D64) == pytest.approx(1.49e-8, rel=1e-2)
    assert info.stats()["inner_floor"] == 0.0 and not y["W1"].requires_grad
    _, gd = solve_inner(g, x, y0, batch, solver="gd")  # the old defaults: 20 steps of 0.1
    assert gd.iterations == 20 and gd.grad_norm > 0.1 and not gd.converged
    with pytest.raises(UsageError, match="solver='gd'"):
        solve_inner(g, x, {k: t.unsqueeze(0) for k, t in y0.items()}, batch, batched=True)


@pytest.mark.parametrize("problem", [logistic_problem, tanh_mlp_problem])
def test_hypergradient_matches_finite_differences_at_defaults(problem):
    """solve_inner then hypergradient, all at their defaults, against central differences of
    Phi(x) = f(x, y*(x)) with y* from the independent dense Newton solve (to 1e-12), step 1e-5."""
    g, f, x, y0, inner_b, outer_b = problem()
    y, inner = solve_inner(g, x, y0, inner_b)
    grads, info = hypergradient(g, f, x, y, inner_batch=inner_b, outer_batch=outer_b, inner_info=inner)
    assert info.problems == {} and info.inner_grad_norm == pytest.approx(inner.grad_norm, rel=1e-12)
    y_ref = reference_newton(g, x, y, inner_b)
    xv, step = x["log_pen"].detach(), 1e-5
    fd = torch.zeros_like(xv)
    for j in range(xv.numel()):
        phis = []
        for sign in (1.0, -1.0):
            xj = {"log_pen": xv + sign * step * torch.nn.functional.one_hot(torch.tensor(j), xv.numel()).to(D64)}
            phis.append(float(f(xj, reference_newton(g, xj, y_ref, inner_b), outer_b)))
        fd[j] = (phis[0] - phis[1]) / (2 * step)
    torch.testing.assert_close(grads["log_pen"], fd, rtol=1e-6, atol=1e-8)
    assert float(fd.norm()) > 1e-3
    # the same call after 2 gd steps is far off: the comparison can fail
    y_bad, _ = solve_inner(g, x, y0, inner_b, solver="gd", steps=2)
    bad, _ = hypergradient(g, f, x, y_bad, inner_batch=inner_b, outer_batch=outer_b, check=False)
    assert float((bad["log_pen"] - fd).norm()) > 1e-2 * float(fd.norm())


def test_hypergradient_warns_when_inner_unsolved():
    """2 gd steps: d_y g is not small -> one HypergradientWarning (fixed text, so once per call site), the
    numbers in info.problems on every call; a solved problem warns about nothing."""
    g, f, x, y0, inner_b, outer_b = tanh_mlp_problem()
    y, _ = solve_inner(g, x, y0, inner_b, solver="gd", steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: each warning text once per location
        for _ in range(3):
            _, info = hypergradient(g, f, x, y, inner_batch=inner_b, outer_batch=outer_b)
            assert "inner" in info.problems and "exceeds inner_tol" in info.problems["inner"]
    inner_warnings = [w for w in record if "inner gradient at y is not small" in str(w.message)]
    assert len(inner_warnings) == 1 and inner_warnings[0].category is HypergradientWarning
    assert inner_warnings[0].filename == __file__  # attributed to the caller's line
    assert info.inner_grad_norm > 1e-2
    # a looser inner_tol accepts it
    with pytest.warns(HypergradientWarning, match="not positive definite"):  # y is not a minimum yet either
        _, loose = hypergradient(g, f, x, y, inner_batch=inner_b, outer_batch=outer_b, inner_tol=10.0)
    assert "inner" not in loose.problems
    y, _ = solve_inner(g, x, y0, inner_b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = hypergradient(g, f, x, y, inner_batch=inner_b, outer_batch=outer_b)
    assert info.problems == {}


def test_hypergradient_strict_raises():
    """strict=True: each cause is one line of HypergradientError (a UsageError)."""
    g, f, x, y0, inner_b, outer_b = logistic_problem()
    y, _ = solve_inner(g, x, y0, inner_b)
    kw = dict(inner_batch=inner_b, outer_batch=outer_b, strict=True)
    hypergradient(g, f, x, y, **kw)  # solved: nothing to raise
    y_bad, _ = solve_inner(g, x, y0, inner_b, solver="gd", steps=2)
    nan_batch = (outer_b[0].clone(), outer_b[1])
    nan_batch[0][0, 0] = float("nan")
    concave = lambda x, y, b: -0.5 * (y["w"] ** 2).sum() + (x["log_pen"] * y["w"]).sum()  # noqa: E731
    cases = [("inner gradient", dict(g=g, y=y_bad)), ("did not converge", dict(g=g, y=y, cg_steps=1)),
             ("not positive definite", dict(g=concave, y={"w": x["log_pen"].detach()})),
             ("not finite", dict(g=g, y=y, outer_batch=nan_batch))]
    for match, case in cases:
        args = {**kw, **{k: v for k, v in case.items() if k not in ("g", "y")}}
        with pytest.raises(HypergradientError, match=match) as err:
            hypergradient(case["g"], f, x, case["y"], **args)
        assert "\n" not in str(err.value) and isinstance(err.value, UsageError)


def test_hypergradient_accepts_tuples():
    """x and y as tuples, lists, nested dicts: the same numbers as flat dicts, grads in x's structure (None where
    a tensor does not require grad), v in y's, solve_inner's y in y0's."""
    g, f, x, y0, inner_b, outer_b = tanh_mlp_problem()
    y, _ = solve_inner(g, x, y0, inner_b)
    grads, info = hypergradient(g, f, x, y, inner_batch=inner_b, outer_batch=outer_b)
    frozen = torch.ones(2, dtype=D64)

    def to_dicts(xt, yt):
        return {"log_pen": xt[0]}, {"W1": yt["first"][0], "b1": yt["first"][1][0], "w2": yt["w2"]}

    g_t = lambda xt, yt, b: g(*to_dicts(xt, yt), b) + 0.0 * xt[1].sum()  # noqa: E731
    f_t = lambda xt, yt, b: f(*to_dicts(xt, yt), b)  # noqa: E731
    xt = (x["log_pen"], frozen)
    y0t = {"first": (y0["W1"], [y0["b1"]]), "w2": y0["w2"]}
    yt, inner = solve_inner(g_t, xt, y0t, inner_b)
    assert isinstance(yt["first"], tuple) and isinstance(yt["first"][1], list) and inner.converged
    torch.testing.assert_close(yt["w2"], y["w2"], rtol=0, atol=0)
    grads_t, info_t = hypergradient(g_t, f_t, xt, yt, inner_batch=inner_b, outer_batch=outer_b)
    assert isinstance(grads_t, tuple) and len(grads_t) == 2 and grads_t[1] is None
    torch.testing.assert_close(grads_t[0], grads["log_pen"], rtol=1e-12, atol=1e-15)
    assert isinstance(info_t.v["first"], tuple)
    torch.testing.assert_close(info_t.v["first"][0], info.v["W1"], rtol=1e-12, atol=1e-15)
    # a list x, a bare-tensor y
    ga, fa, xa, ya0, ia, oa = logistic_problem()
    g_l = lambda xl, w, b: ga({"log_pen": xl[0]}, {"w": w}, b)  # noqa: E731
    f_l = lambda xl, w, b: fa({"log_pen": xl[0]}, {"w": w}, b)  # noqa: E731
    w, _ = solve_inner(g_l, [xa["log_pen"]], ya0["w"], ia)
    grads_l, info_l = hypergradient(g_l, f_l, [xa["log_pen"]], w, inner_batch=ia, outer_batch=oa)
    ref, _ = hypergradient(ga, fa, xa, {"w": w}, inner_batch=ia, outer_batch=oa)
    assert isinstance(grads_l, list) and isinstance(info_l.v, torch.Tensor)
    torch.testing.assert_close(grads_l[0], ref["log_pen"], rtol=0, atol=0)


def test_hypergradient_no_x_requiring_grad():
    g, f, x, y0, inner_b, outer_b = logistic_problem()
    y, _ = solve_inner(g, x, y0, inner_b)
    frozen = {"log_pen": x["log_pen"].detach()}
    with pytest.raises(UsageError, match="no tensor of x requires grad") as err:
        hypergradient(g, f, frozen, y, inner_batch=inner_b, outer_batch=outer_b)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="no tensor of x requires grad"):
        hypergradient(g, f, (frozen["log_pen"],), y, inner_batch=inner_b, outer_batch=outer_b)
    surrogate, _ = hypergradient(g, f, frozen, y, inner_batch=inner_b, outer_batch=outer_b, return_surrogate=True)
    assert surrogate.dim() == 0 and torch.isfinite(surrogate)  # allowed when asked for (the batches may carry graph)


def test_direct_solve_matches_cg():
    """implicit="direct": the dense Hessian (Cholesky) gives CG's v and gradients, with its own statistics;
    batched per task; an indefinite Hessian goes to LU and is reported; too large a y is refused."""
    g, f, x, y0, inner_b, outer_b = tanh_mlp_problem()
    y, _ = solve_inner(g, x, y0, inner_b)
    kw = dict(inner_batch=inner_b, outer_batch=outer_b)
    cg, info_cg = hypergradient(g, f, x, y, cg_steps=200, cg_tol=1e-14, **kw)
    direct, info = hypergradient(g, f, x, y, implicit="direct", **kw)
    torch.testing.assert_close(direct["log_pen"], cg["log_pen"], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(info.v["W1"], info_cg.v["W1"], rtol=1e-9, atol=1e-12)
    assert info.solve.iterations == 0 and info.solve.residual < 1e-12 and info.solve.converged
    assert info.solve.nonpositive_curvature == 0 and info.problems == {}
    # batched: ridge tasks stacked, each task's v as per task
    xr, tasks = ridge_x(3), ridge_tasks(3, seed=3)

    def stacked(fn):
        return lambda x, y, b: torch.stack([fn(x, {"y": y["y"][c]}, (b[0][c], b[1][c])) for c in range(3)])

    sb = (torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks]))
    qb = (torch.stack([t.query_x for t in tasks]), torch.stack([t.query_y for t in tasks]))
    yb = {"y": torch.stack([inner_solution(xr["x"].detach(), t, LAM) for t in tasks])}
    gb, ib = hypergradient(stacked(ridge_g), stacked(ridge_f), xr, yb, inner_batch=sb, outer_batch=qb,
                           implicit="direct", batched=True)
    torch.testing.assert_close(gb["x"], 3 * true_hypergradient(xr["x"], tasks, LAM), rtol=1e-10, atol=1e-13)  # a mean
    assert ib.solve.rows["residual"].shape == (3,) and ib.problems == {}
    # indefinite: LU solves it exactly, the curvature is reported
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=D64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=D64)
    v, solve = implicit_solve(lambda t: a @ t, b, implicit="direct")
    torch.testing.assert_close(v, torch.tensor([0.5, -1.0, 1 / 3], dtype=D64), rtol=1e-14, atol=0)
    assert solve.nonpositive_curvature == 1 and solve.iterations == 0
    with pytest.raises(UsageError, match="use implicit='cg'"):
        implicit_solve(lambda t: t, torch.ones(5000, dtype=D64), implicit="direct")


def test_newton_rounding_floor_sets_flag():
    """Asked for a tolerance below what the dtype resolves, Newton stops at the rounding floor and says so
    (floor=True, not converged, not capped), in float64 and float32."""
    g, _, x, y0, batch, _ = tanh_mlp_problem()
    for dtype, tol in ((D64, 1e-20), (torch.float32, 1e-10)):
        cast = lambda d: {k: t.detach().to(dtype) for k, t in d.items()}  # noqa: E731
        y, info = solve_inner(g, cast(x), cast(y0), (batch[0].to(dtype), batch[1].to(dtype)), tol=tol)
        assert info.floor and not info.converged and not info.capped and info.grad_norm > tol
        assert info.iterations < 100 and info.stats()["inner_floor"] == 1.0
        assert info.grad_norm < 1e3 * torch.finfo(dtype).eps  # it did solve as far as the dtype resolves
