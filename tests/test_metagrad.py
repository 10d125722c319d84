"""Meta-gradients of every algorithm against what it claims to differentiate (float64).

- unrolled (maml, anil, itd-bio): finite differences of the query loss after K inner steps, computed
  by an independent reference (functional_call on the whole model, no split);
- implicit (mrml, imaml): finite differences of f(x, y*(x)), y* recomputed at x +- eps by many
  inner steps on a strongly convex inner problem (lam = 2, where y_K = y*), or, at small lam, by the
  independent reference's Newton (`mrml.reference`); closed forms on linear/ridge regression;
- first order (fomaml, reptile): their documented formulas; protonet: finite differences of its loss.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mrml.algorithms import ALGORITHMS, AlgoConfig, build_algorithm
from mrml.data.base import Episode
from mrml.errors import UsageError
from mrml.models.backbones import FewShotNet, conv_block
from mrml.reference import exact_hypergradient, objective
from ridge import ridge_model, ridge_tasks, true_hypergradient

DT = torch.float64
EPS = 1e-6
NAMES = ["mrml", "maml", "fomaml", "anil", "itd-bio", "imaml", "reptile", "protonet"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 problems: thread start-up costs more than the arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- tiny networks and tasks ---------------------------------------------------------------------
def relu_net(seed: int = 0) -> FewShotNet:
    """The real Conv-4 block (conv, batch norm, ReLU, max-pool), 2 filters, on 1x6x6; 3-way head."""
    torch.manual_seed(seed)
    net = FewShotNet(nn.Sequential(conv_block(1, 2), nn.Flatten()), 18, 3, zero_head=False).double()
    return net


def smooth_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, track_running_stats=False),
                         nn.Tanh(), nn.AvgPool2d(2))


def smooth_net(seed: int = 0) -> FewShotNet:
    """Two smooth conv blocks on 1x8x8 (tanh, average pooling: no kinks, so inner solutions can be
    found to machine precision). Batch norm makes the loss scale-invariant in the conv weights, with
    curvature ~ 1/||w||^2: doubling them keeps the proximal inner problem strongly convex at lam = 2
    (support-loss Hessian eigenvalues within about [-0.7, 5] at the inner solution)."""
    torch.manual_seed(seed)
    net = FewShotNet(nn.Sequential(smooth_block(1, 2), smooth_block(2, 2), nn.Flatten()), 8, 3, zero_head=False).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(2.0)
    return net


def image_tasks(n: int, size: int = 6, ways: int = 3, shots: int = 2, query: int = 2, seed: int = 0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(Episode(torch.randn(ways * shots, 1, size, size, generator=g, dtype=DT),
                           torch.arange(ways).repeat_interleave(shots),
                           torch.randn(ways * query, 1, size, size, generator=g, dtype=DT),
                           torch.arange(ways).repeat_interleave(query)))
    return out


# -- independent references ----------------------------------------------------------------------
def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def inner_descent(model, params, inner, x, labels, steps, lr, lam, centre, loss=F.cross_entropy):
    """Plain gradient descent on loss + lam/2||y - centre||^2 over the parameters named `inner`."""
    y = {n: params[n] for n in inner}
    for _ in range(steps):
        y = {n: v.detach().requires_grad_(True) for n, v in y.items()}
        with torch.enable_grad():
            g = loss(functional_call(model, {**params, **y}, (x,)), labels)
            if lam > 0:
                g = g + 0.5 * lam * sum(((v - centre[n]) if centre is not None else v).pow(2).sum() for n, v in y.items())
            grads = torch.autograd.grad(g, list(y.values()))
        y = {n: (v - lr * gn).detach() for (n, v), gn in zip(y.items(), grads)}
    return y


def query_objective(model, params, tasks, inner, steps, lr, lam=0.0, prox=False):
    """Mean over tasks of the query loss after `steps` inner steps from the inner part's init in `params`."""
    total = 0.0
    with torch.no_grad():
        for ep in tasks:
            centre = {n: params[n] for n in inner} if prox else None
            y = inner_descent(model, params, inner, ep.support_x, ep.support_y, steps, lr, lam, centre)
            total += float(F.cross_entropy(functional_call(model, {**params, **y}, (ep.query_x,)), ep.query_y))
    return total / len(tasks)


def grads_of(model: nn.Module, names: list[str]) -> torch.Tensor:
    ps = dict(model.named_parameters())
    return torch.cat([(ps[n].grad if ps[n].grad is not None else torch.zeros_like(ps[n])).reshape(-1) for n in names])


def fd_gradient(objective, params: dict[str, torch.Tensor], names: list[str], eps: float = EPS) -> torch.Tensor:
    """Central differences along every coordinate of the parameters `names`."""
    out = []
    for n in names:
        for i in range(params[n].numel()):
            vals = []
            for s in (eps, -eps):
                p = dict(params)
                p[n] = params[n].clone()
                p[n].view(-1)[i] += s
                vals.append(objective(p))
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=DT)


def fd_directional(objective, params, names, grad: torch.Tensor, n_random: int = 2, seed: int = 0, eps: float = EPS):
    """Worst |FD - <grad, d>| / ||grad|| over unit directions d: grad itself and `n_random` random ones."""
    g = torch.Generator().manual_seed(seed)
    dirs = [grad / grad.norm()] + [torch.randn(grad.numel(), generator=g, dtype=DT) for _ in range(n_random)]
    worst = 0.0
    for d in dirs:
        d = d / d.norm()
        vals = []
        for s in (eps, -eps):
            p, i = dict(params), 0
            for n in names:
                k = params[n].numel()
                p[n] = params[n] + s * d[i : i + k].view_as(params[n])
                i += k
            vals.append(objective(p))
        fd = (vals[0] - vals[1]) / (2 * eps)
        worst = max(worst, abs(fd - float(grad @ d)) / float(grad.norm()))
    return worst


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def head_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


def all_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


# -- unrolled: maml, anil, itd-bio against finite differences -------------------------------------
@pytest.mark.parametrize("name,recompute", [("maml", False), ("anil", False), ("anil", True), ("itd-bio", False), ("itd-bio", True)])
def test_metagrad_unrolled_matches_finite_differences(name, recompute):
    """recompute: the paper-code form, the backbone re-run with gradient inside every inner step."""
    model, tasks = relu_net(), image_tasks(2)
    k, lr = 3, 0.3
    lam = {"maml": 0.0, "anil": 0.0, "itd-bio": 0.1}[name]
    cfg = AlgoConfig(inner_steps=k, inner_lr=lr, l2=lam, recompute_features=recompute)
    algo = build_algorithm(name, model, "classification", cfg)
    stats = algo.meta_gradient(tasks)
    inner = all_names(model) if name == "maml" else head_names(model)
    outer = all_names(model) if name != "itd-bio" else [n for n in all_names(model) if n not in inner]
    assert {id(p) for p in algo.outer_parameters()} == {id(p) for n, p in model.named_parameters() if n in outer}
    params = params_of(model)
    fd = fd_gradient(lambda p: query_objective(model, p, tasks, inner, k, lr, lam), params, outer)
    assert rel(grads_of(model, outer), fd) < 1e-6, rel(grads_of(model, outer), fd)
    assert math.isclose(stats.loss, query_objective(model, params, tasks, inner, k, lr, lam), rel_tol=1e-10)
    assert 0.0 <= stats.accuracy <= 1.0
    if name == "itd-bio":  # the head init is fixed: no gradient reaches it
        assert all(p.grad is None for n, p in model.named_parameters() if n in inner)


def guarded_descent(model, params, inner, x, labels, steps, lr, lam):
    """Reference of the divergence guard: a step after which the support loss rose is taken back and
    retried at half the step size (kept for the rest); returns (y_K, final step size)."""
    def value_and_grad(y):
        y = {n: v.detach().requires_grad_(True) for n, v in y.items()}
        with torch.enable_grad():
            g = F.cross_entropy(functional_call(model, {**params, **y}, (x,)), labels)
            g = g + 0.5 * lam * sum(v.pow(2).sum() for v in y.values())
            return float(g.detach()), torch.autograd.grad(g, list(y.values()))

    y, prev, done = {n: params[n] for n in inner}, None, 0
    while done < steps:
        g, grads = value_and_grad(y)
        if prev is not None and g > prev[1] * (1 + 1e-12):
            lr *= 0.5
            y = {n: v - lr * gn for (n, v), gn in zip(prev[0].items(), prev[2])}
            continue
        prev, done = (y, g, grads), done + 1
        y = {n: (v - lr * gn).detach() for (n, v), gn in zip(y.items(), grads)}
    return y, lr


@pytest.mark.parametrize("name", ["anil", "itd-bio", "maml"])
def test_metagrad_unrolled_with_divergence_guard_matches_finite_differences(name):
    """A step size at which plain gradient descent on the support loss diverges: the unrolled loop
    takes back the steps that raised g, as mrml's inner loop does, and its meta-gradient is that of the
    guarded trajectory (step-size decisions are constants). With `plain_inner` the loop is plain GD."""
    model, tasks = relu_net(3), image_tasks(2, seed=3)
    k, lr = 4, {"maml": 4.0, "anil": 40.0, "itd-bio": 40.0}[name]
    lam = 0.1 if name == "itd-bio" else 0.0
    inner = all_names(model) if name == "maml" else head_names(model)
    outer = all_names(model) if name != "itd-bio" else [n for n in all_names(model) if n not in inner]
    params = params_of(model)

    def objective(p, keep=None):
        total = 0.0
        with torch.no_grad():
            for ep in tasks:
                y, step = guarded_descent(model, p, inner, ep.support_x, ep.support_y, k, lr, lam)
                if keep is not None:
                    keep.append(step)
                total += float(F.cross_entropy(functional_call(model, {**p, **y}, (ep.query_x,)), ep.query_y))
        return total / len(tasks)

    steps: list[float] = []
    value = objective(params, steps)
    assert min(steps) < lr, steps  # the guard acted on this problem
    algo = build_algorithm(name, model, "classification", AlgoConfig(inner_steps=k, inner_lr=lr, l2=lam))
    stats = algo.meta_gradient(tasks)
    assert algo.last_inner_lr == steps[-1]
    assert math.isclose(stats.loss, value, rel_tol=1e-10)
    fd = fd_gradient(objective, params, outer)
    assert rel(grads_of(model, outer), fd) < 1e-6, rel(grads_of(model, outer), fd)

    plain = relu_net(3)
    algo = build_algorithm(name, plain, "classification", AlgoConfig(inner_steps=k, inner_lr=lr, l2=lam, plain_inner=True))
    stats = algo.meta_gradient(tasks)
    assert algo.last_inner_lr == lr
    assert math.isclose(stats.loss, query_objective(plain, params, tasks, inner, k, lr, lam), rel_tol=1e-10)
    assert not math.isclose(stats.loss, value, rel_tol=1e-3)


def test_metagrad_maml_k1_quadratic_closed_form():
    """Inner g = 0.5 y'Ay - b'y (support MSE of a linear model), outer f = 0.5||y - c||^2 (query MSE
    with Q = sqrt(d/2) I): y1 = x - alpha (A x - b), meta-gradient (I - alpha A)(y1 - c)."""
    d, n, alpha = 5, 12, 0.1
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    c = torch.randn(d, generator=g, dtype=DT)
    q = math.sqrt(d / 2) * torch.eye(d, dtype=DT)
    ep = Episode(s, t, q, q @ c)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 1, bias=False)).double()
    x = model[0].weight.detach().reshape(-1).clone()
    algo = build_algorithm("maml", model, "regression", AlgoConfig(inner_steps=1, inner_lr=alpha))
    algo.meta_gradient([ep])
    a, b = 2 * s.T @ s / n, 2 * s.T @ t / n
    y1 = x - alpha * (a @ x - b)
    expected = (torch.eye(d, dtype=DT) - alpha * a) @ (y1 - c)
    torch.testing.assert_close(model[0].weight.grad.reshape(-1), expected, rtol=1e-12, atol=1e-13)


# -- first order: fomaml, maml --first-order, reptile ---------------------------------------------
def test_metagrad_fomaml_is_query_gradient_at_adapted_params():
    model, tasks = relu_net(1), image_tasks(2, seed=1)
    k, lr = 3, 0.3
    inner = all_names(model)
    fo = build_algorithm("fomaml", model, "classification", AlgoConfig(inner_steps=k, inner_lr=lr))
    assert fo.config.inner == "all" and fo.config.l2 == 0.0
    fo.meta_gradient(tasks)
    g_fo = grads_of(model, inner)
    params = params_of(model)
    expected = torch.zeros_like(g_fo)
    for ep in tasks:  # d_y f(y_K) with y_K from plain gradient descent
        y = inner_descent(model, params, inner, ep.support_x, ep.support_y, k, lr, 0.0, None)
        y = {n: v.requires_grad_(True) for n, v in y.items()}
        f = F.cross_entropy(functional_call(model, y, (ep.query_x,)), ep.query_y)
        expected += torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(f, list(y.values()))]) / len(tasks)
    assert rel(g_fo, expected) < 1e-12

    # maml with config.first_order is the same algorithm
    model2 = relu_net(1)
    build_algorithm("maml", model2, "classification", AlgoConfig(inner_steps=k, inner_lr=lr, first_order=True)).meta_gradient(tasks)
    assert rel(grads_of(model2, inner), g_fo) < 1e-14

    # second-order maml on the same tasks differs by the dropped term
    model3 = relu_net(1)
    build_algorithm("maml", model3, "classification", AlgoConfig(inner_steps=k, inner_lr=lr)).meta_gradient(tasks)
    assert rel(grads_of(model3, inner), g_fo) > 1e-3


@pytest.mark.parametrize("with_query", [True, False])
def test_metagrad_reptile_is_init_minus_adapted(with_query):
    model, tasks = relu_net(2), image_tasks(3, seed=2)
    k, lr = 4, 0.2
    inner = all_names(model)
    algo = build_algorithm("reptile", model, "classification",
                           AlgoConfig(inner_steps=k, inner_lr=lr, extra={"reptile_query": with_query}))
    stats = algo.meta_gradient(tasks)
    params = params_of(model)
    x0 = torch.cat([params[n].reshape(-1) for n in inner])
    expected = torch.zeros_like(x0)
    for ep in tasks:
        xs, ys = (torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])) if with_query \
            else (ep.support_x, ep.support_y)
        y = inner_descent(model, params, inner, xs, ys, k, lr, 0.0, None)
        expected += (x0 - torch.cat([y[n].reshape(-1) for n in inner])) / len(tasks)
    assert rel(grads_of(model, inner), expected) < 1e-12
    assert math.isfinite(stats.loss) and 0.0 <= stats.accuracy <= 1.0
    # an outer SGD step of size 1 moves the init onto the mean adapted parameters
    opt = torch.optim.SGD(algo.outer_parameters(), lr=1.0)
    opt.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), x0 - expected,
                               rtol=1e-12, atol=1e-14)


# -- protonet -----------------------------------------------------------------------------------
def proto_objective(model, params, tasks) -> float:
    """Query cross-entropy of -squared distances to class-mean backbone features (loop reference)."""
    bb = {n[len("backbone."):]: v for n, v in params.items() if n.startswith("backbone.")}
    total = 0.0
    with torch.no_grad():
        for ep in tasks:
            fs = functional_call(model.backbone, bb, (ep.support_x,))
            fq = functional_call(model.backbone, bb, (ep.query_x,))
            protos = torch.stack([fs[ep.support_y == c].mean(0) for c in range(int(ep.support_y.max()) + 1)])
            logits = torch.stack([-((fq - p) ** 2).sum(1) for p in protos], 1)
            total += float(F.cross_entropy(logits, ep.query_y))
    return total / len(tasks)


def test_metagrad_protonet_matches_finite_differences():
    model, tasks = relu_net(3), image_tasks(2, seed=3)
    algo = build_algorithm("protonet", model, "classification", AlgoConfig())
    stats = algo.meta_gradient(tasks)
    backbone = [n for n in all_names(model) if n.startswith("backbone.")]
    assert {id(p) for p in algo.outer_parameters()} == {id(p) for p in model.backbone.parameters()}
    assert all(p.grad is None for p in model.head.parameters())
    params = params_of(model)
    fd = fd_gradient(lambda p: proto_objective(model, p, tasks), params, backbone)
    assert rel(grads_of(model, backbone), fd) < 1e-6
    assert math.isclose(stats.loss, proto_objective(model, params, tasks), rel_tol=1e-12)
    torch.optim.Adam(algo.outer_parameters(), lr=1e-3).step()
    pred = algo.adapt(tasks[0])
    assert pred.shape == (6, 3)
    with pytest.raises(UsageError, match="classification"):
        build_algorithm("protonet", relu_net(), "regression", AlgoConfig())


# -- implicit: mrml (head / last-block / all), imaml ----------------------------------------------
def implicit_objective(model, params, tasks, inner, lam, prox, steps, lr) -> float:
    return query_objective(model, params, tasks, inner, steps, lr, lam, prox)


@pytest.mark.parametrize("name,inner_spec", [("mrml", "head"), ("mrml", "last-block"), ("mrml", "all"), ("imaml", None)])
def test_metagrad_implicit_matches_finite_differences(name, inner_spec):
    """f(x, y*(x)) with y* by many inner steps (strongly convex: ridge on the head, proximal elsewhere)."""
    model, tasks = smooth_net(), image_tasks(2, size=8, seed=4)
    lam, lr, steps = 2.0, 0.3, 60
    cfg = AlgoConfig(inner=inner_spec, l2=lam, inner_lr=lr, inner_steps=steps, cg_steps=200, cg_tol=1e-14, learn_l2=False)
    algo = build_algorithm(name, model, "classification", cfg)
    stats = algo.meta_gradient(tasks)
    assert stats.extra["nonpositive_curvature"] == 0 and stats.extra["cg_residual"] < 1e-12
    prox = inner_spec != "head"
    assert algo.prox == prox
    spec = {"head": "head.", "last-block": ("backbone.1.", "head."), "all": "", None: ""}[inner_spec]
    inner = [n for n in all_names(model) if n.startswith(spec)]
    outer = all_names(model) if prox else [n for n in all_names(model) if n not in inner]
    assert {id(p) for p in algo.outer_parameters()} == {id(p) for n, p in model.named_parameters() if n in outer}
    grad = grads_of(model, outer)
    assert torch.isfinite(grad).all()
    if prox:  # the learned centre gets a (nonzero) gradient
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in inner)
    else:
        assert all(p.grad is None for n, p in model.named_parameters() if n in inner)
    params = params_of(model)
    err = fd_directional(lambda p: implicit_objective(model, p, tasks, inner, lam, prox, steps, lr), params, outer, grad, n_random=1)
    assert err < 1e-6, err


def with_params(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(params, strict=False)
    return m


@pytest.mark.parametrize("lam", [0.1, 0.01])
def test_metagrad_mrml_small_lam_exact_inner_solver_matches_finite_differences(lam):
    """At small lam, K gradient steps stop far from y* (the test above uses lam = 2, where y_K = y*). With
    the exact inner solver (inner_solver="newton") mrml's meta-gradient is the hypergradient of
    f(x, y*(x)): central differences of Phi with y* from the independent reference's Newton. Algorithm 1
    as written (inner_solver="gd", K = 60) keeps its known bias here: the implicit formula at y_K != y*."""
    model, tasks = smooth_net(), image_tasks(2, size=8, seed=4)
    inner = head_names(model)
    outer = [n for n in all_names(model) if n not in inner]
    params = params_of(model)
    phi = lambda p: objective(with_params(model, p), tasks, "classification", lam)  # noqa: E731
    exact = exact_hypergradient(model, tasks, "classification", lam).flat(outer)
    assert fd_directional(phi, params, outer, exact, n_random=1) < 1e-7  # the reference itself

    cfg = AlgoConfig(inner="head", l2=lam, inner_solver="newton", inner_tol=1e-12, inner_steps=50, cg_steps=200,
                     cg_tol=1e-14)
    build_algorithm("mrml", model, "classification", cfg).meta_gradient(tasks)
    grad = grads_of(model, outer)
    assert rel(grad, exact) < 1e-8, rel(grad, exact)
    err = fd_directional(phi, params, outer, grad, n_random=1)
    assert err < 1e-6, err

    gd = AlgoConfig(inner="head", l2=lam, inner_solver="gd", implicit="cg", inner_lr=0.3, inner_steps=60, cg_steps=200,
                    cg_tol=1e-14)
    build_algorithm("mrml", model, "classification", gd).meta_gradient(tasks)
    assert rel(grads_of(model, outer), exact) > 1e-2, rel(grads_of(model, outer), exact)


def test_metagrad_mrml_wide_inner_runs_on_conv4_blocks():
    """One meta-step with the real conv blocks and inner last-block / all: finite gradients everywhere,
    the proximal centre learned; then an Adam step and test-time adaptation."""
    torch.manual_seed(5)
    model = FewShotNet(nn.Sequential(conv_block(1, 2), conv_block(2, 2), nn.Flatten()), 8, 3).double()
    tasks = image_tasks(2, size=8, seed=5)
    for spec in ("last-block", "all"):
        algo = build_algorithm("mrml", model, "classification", AlgoConfig(inner=spec, l2=1.0, inner_steps=5, cg_steps=5))
        assert algo.prox
        stats = algo.meta_gradient(tasks)
        assert math.isfinite(stats.loss) and stats.accuracy is not None
        params = algo.outer_parameters()
        assert len(params) == len(list(model.parameters()))
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        assert all(p.grad.abs().sum() > 0 for p in algo.split.inner_parameters())
        torch.optim.Adam(params, lr=1e-3).step()
        assert torch.isfinite(algo.adapt(tasks[0])).all()


LAM = 0.5


def test_metagrad_mrml_ridge_closed_form():
    tasks, model = ridge_tasks(4), ridge_model()
    algo = build_algorithm("mrml", model, "regression", AlgoConfig(inner="1", l2=LAM, inner_lr=0.3, inner_steps=300, cg_steps=10, learn_l2=False))
    algo.meta_gradient(tasks)
    ref = true_hypergradient(model[0].weight.detach().T, tasks, LAM).T
    assert rel(model[0].weight.grad, ref) < 1e-9


def test_metagrad_imaml_linear_regression_closed_form():
    """Whole model linear, w in R^d: y* = (H_s + lam I)^{-1}(2 A_s'b_s/n + lam x) with H_s = 2 A_s'A_s/n;
    the hypergradient of mean_i f_i(y_i*) by autograd through torch.linalg.solve."""
    tasks, lam, d = ridge_tasks(4, seed=6), 1.0, 6
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(d, 1, bias=False)).double()
    algo = build_algorithm("imaml", model, "regression", AlgoConfig(l2=lam, inner_lr=0.2, inner_steps=300, cg_steps=20))
    assert algo.prox and algo.config.inner == "all"
    stats = algo.meta_gradient(tasks)

    x = model[0].weight.detach().reshape(-1).clone().requires_grad_(True)
    total = 0
    for ep in tasks:
        a, b, n = ep.support_x, ep.support_y, ep.support_x.shape[0]
        h = 2 * a.T @ a / n + lam * torch.eye(d, dtype=DT)
        y = torch.linalg.solve(h, 2 * a.T @ b / n + lam * x)
        total = total + ((ep.query_x @ y - ep.query_y) ** 2).mean()
    phi = total / len(tasks)
    (ref,) = torch.autograd.grad(phi, x)
    assert rel(model[0].weight.grad.reshape(-1), ref) < 1e-9
    assert math.isclose(stats.loss, float(phi.detach()), rel_tol=1e-9)
    # iMAML's form: lam (H + lam I)^{-1} d_y f = (I + H/lam)^{-1} d_y f, here per task
    with pytest.raises(UsageError):
        build_algorithm("imaml", model, "regression", AlgoConfig(l2=0.0))


@pytest.mark.parametrize("name", ["itd-bio", "anil"])
def test_metagrad_unrolled_converges_to_implicit_hypergradient(name):
    """On ridge tasks (strongly convex inner problem) the backbone part of ITD-BiO's and ANIL's
    meta-gradient tends to the closed-form hypergradient as K grows (ANIL: whatever its head init)."""
    tasks = ridge_tasks(3)
    errors = []
    for k in (5, 20, 80, 320):
        model = ridge_model()
        if name == "anil":
            with torch.no_grad():
                model[1].weight.normal_()
        algo = build_algorithm(name, model, "regression", AlgoConfig(inner="1", l2=LAM, inner_lr=0.3, inner_steps=k))
        algo.meta_gradient(tasks)
        ref = true_hypergradient(model[0].weight.detach().T, tasks, LAM).T
        errors.append(rel(model[0].weight.grad, ref))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


# -- every algorithm over the one interface --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_metagrad_every_algorithm_builds_steps_and_adapts(name):
    assert name in ALGORITHMS
    model, tasks = relu_net(7), image_tasks(2, seed=7)
    algo = build_algorithm(name, model, "classification", AlgoConfig(inner_steps=2, cg_steps=2, test_steps=2))
    params = algo.outer_parameters()
    opt = torch.optim.Adam(params, lr=1e-3)
    stats = algo.meta_gradient(tasks)
    assert math.isfinite(stats.loss) and 0.0 <= stats.accuracy <= 1.0
    assert any(p.grad is not None for p in params)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    ev = algo.evaluate(tasks[0])
    assert math.isfinite(ev.loss) and 0.0 <= ev.accuracy <= 1.0
    # regression (sinusoid-like) tasks on an MLP: all but protonet
    torch.manual_seed(0)
    mlp = FewShotNet(nn.Sequential(nn.Linear(1, 8), nn.ReLU()), 8, 1).double()
    rng = np.random.default_rng(0)
    xs = torch.from_numpy(rng.uniform(-5, 5, (10, 1)))
    ep = Episode(xs[:5], torch.sin(xs[:5, 0]), xs[5:], torch.sin(xs[5:, 0]))
    if name == "protonet":
        with pytest.raises(UsageError):
            build_algorithm(name, mlp, "regression", AlgoConfig())
        return
    reg = build_algorithm(name, mlp, "regression", AlgoConfig(inner_steps=2, cg_steps=2, test_steps=2))
    st = reg.meta_gradient([ep])
    assert math.isfinite(st.loss) and st.accuracy is None
    assert torch.isfinite(reg.adapt(ep)).all()


def test_metagrad_unknown_algorithm_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown algorithm"):
        build_algorithm("nope", relu_net(), "classification", AlgoConfig())
