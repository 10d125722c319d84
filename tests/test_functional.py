"""The functional core (mrml.functional, mrml.implicit.cg_solver): exact hypergradients in float64 against
closed forms and the independent reference, the surrogate, batched tasks, torchopt-style solves on
tensor trees, and the classes (MRML per task and task-batched) equal to the functions they call."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mrml import cg_solver, hypergradient, solve_inner
from mrml.algorithms import MRML, AlgoConfig
from mrml.data.base import Episode
from mrml.errors import UsageError
from mrml.functional import descend, descend_tasks, flatten, inner_value_and_grad
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
    y, _ = solve_inner(ridge_g, x, {"y": torch.zeros(4, dtype=D64)}, (ep.support_x, ep.support_y), steps=5, lr=0.05)
    kw = dict(inner_batch=(ep.support_x, ep.support_y), outer_batch=(ep.query_x, ep.query_y), cg_steps=4)
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
    yb, inner = solve_inner(stacked(ridge_g), x, y0, sb, steps=k, lr=lr, batched=True)
    grads_b, info_b = hypergradient(stacked(ridge_g), stacked(ridge_f), x, yb, inner_batch=sb, outer_batch=qb,
                                    cg_steps=30, cg_tol=1e-13, batched=True)
    total = torch.zeros_like(x["x"])
    lrs = []
    for c, ep in enumerate(tasks):
        y, one = solve_inner(ridge_g, x, {"y": torch.zeros(4, dtype=D64)}, (ep.support_x, ep.support_y), steps=k, lr=lr)
        lrs.append(one.lr)
        torch.testing.assert_close(yb["y"][c], y["y"], rtol=1e-12, atol=1e-14)
        grads, info = hypergradient(ridge_g, ridge_f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                    outer_batch=(ep.query_x, ep.query_y), cg_steps=30, cg_tol=1e-13)
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
        y, inner = solve_inner(g, x, y0, (ep.support_x, ep.support_y), steps=k, lr=lr)
        grads, info = hypergradient(g, f, x, y, inner_batch=(ep.support_x, ep.support_y),
                                    outer_batch=(ep.query_x, ep.query_y), cg_steps=n)
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
