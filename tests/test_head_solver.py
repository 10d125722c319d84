"""The batched head solver layer (`mrml.solvers.head`) against independent references, task by task.

float64; references written here from torch alone: the loss as a plain function of W, its autograd
gradients and dense Hessians with dense solves, and a plain per-task Newton loop (`plain_newton`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from mrml.errors import UsageError
from mrml.solvers import HeadProblem, newton_heads, spd_solve

D64 = torch.float64


def stacked(kind: str, t: int, n: int, c: int, d: int, bias: bool, lam, centre: bool = True, seed: int = 0,
            scales=None):
    """T tasks (feature scale per task from `scales`), their HeadProblem and each task's g as a plain function
    of W (`reference_g`)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(t, n, d, generator=g, dtype=D64)
    if scales is not None:
        feats = feats * torch.tensor(scales, dtype=D64)[:, None, None]
    targets = (torch.randint(0, c, (t, n), generator=g) if kind == "classification"
               else torch.randn(t, n, c, generator=g, dtype=D64))
    w0 = torch.randn(t, c, d + bias, generator=g, dtype=D64) if centre else None
    w = torch.randn(t, c, d + bias, generator=g, dtype=D64)
    prob = HeadProblem.build(feats, targets, kind, lam, bias, w0)
    lam_i = (lambda i: lam[i]) if isinstance(lam, torch.Tensor) and lam.dim() == 1 else (lambda i: lam)
    per_task = [reference_g(kind, feats[i], targets[i], lam_i(i), bias, None if w0 is None else w0[i])
                for i in range(t)]
    return prob, per_task, w, feats, targets, w0


def reference_g(kind, feats, targets, lam, bias, w0):
    """g(W) = loss(F~ W') + (lam/2)||W - W0||^2 of one task, written without the solver layer."""
    def g(w: torch.Tensor) -> torch.Tensor:
        z = feats @ w[:, : feats.shape[1]].T + (w[:, -1] if bias else 0.0)
        loss = F.cross_entropy(z, targets) if kind == "classification" else F.mse_loss(z, targets)
        return loss + 0.5 * lam * (w - (w0 if w0 is not None else 0.0)).pow(2).sum()
    return g


def grad_of(g, w: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    wr = w.detach().requires_grad_(True) if not create_graph else w
    with torch.enable_grad():
        value = g(wr)
        return value, torch.autograd.grad(value, wr, create_graph=create_graph)[0]


def lams(t: int):
    """A 0-d tensor (T = 1), a float (T = 4) or one lambda per task (T = 7)."""
    return {1: torch.tensor(0.3, dtype=D64), 4: 0.3}.get(t, torch.linspace(0.05, 0.9, t, dtype=D64))


@pytest.mark.parametrize("t", [1, 4, 7])
@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [4, 12])  # n C < C p1 and n C >= C p1
def test_head_problem_equals_dense_autograd_per_task(t, kind, bias, n):
    c, d = 3, 8 - bias
    prob, per_task, w, feats, targets, w0 = stacked(kind, t, n, c, d, bias, lams(t))
    lam = lams(t)
    v = torch.randn_like(w)
    values, grads = prob.value_grad(w)
    data_values, data_grads = prob.data_value_grad(w)
    a = prob.weights(w)
    hv, gd = prob.hvp(w, v, a), prob.grad_dot(w, v)
    close = dict(rtol=1e-11, atol=1e-12)
    for i, g in enumerate(per_task):
        value, grad = grad_of(g, w[i])
        data_value, data_grad = grad_of(reference_g(kind, feats[i], targets[i], 0.0, bias, None), w[i])
        h = hessian(g, w[i]).reshape(w[i].numel(), w[i].numel())
        torch.testing.assert_close(values[i], value.detach(), **close)
        torch.testing.assert_close(grads[i], grad, **close)
        torch.testing.assert_close(data_values[i], data_value.detach(), **close)
        torch.testing.assert_close(data_grads[i], data_grad, **close)
        torch.testing.assert_close(hv[i], (h @ v[i].reshape(-1)).reshape(w[i].shape), **close)
        torch.testing.assert_close(gd[i], (grad * v[i]).sum(), **close)
        # A_i: the per-example blocks of the data loss's Hessian in the logits (block diagonal over examples)
        f1 = torch.cat([feats[i], torch.ones(n, 1, dtype=D64)], 1) if bias else feats[i]

        def data_in_logits(z):
            return F.cross_entropy(z, targets[i]) if kind == "classification" else F.mse_loss(z, targets[i])

        hz = hessian(data_in_logits, f1 @ w[i].T).reshape(n, c, n, c)
        torch.testing.assert_close(a[i], torch.stack([hz[j, :, j] for j in range(n)]), **close)
        for form in ("dual", "primal", "woodbury"):
            ref = torch.linalg.solve(h, v[i].reshape(-1)).reshape(w[i].shape)
            torch.testing.assert_close(prob.solve(w, v, a, form=form)[i], ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_grad_dot_gradients_in_feats_lambda_and_centre_equal_per_task(kind):
    t, n, c, d = 4, 6, 3, 5
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(t, n, d, generator=g, dtype=D64, requires_grad=True)
    targets = torch.randint(0, c, (t, n), generator=g) if kind == "classification" else torch.randn(t, n, c, generator=g, dtype=D64)
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64, requires_grad=True)
    centre = torch.randn(t, c, d + 1, generator=g, dtype=D64, requires_grad=True)
    w, v = torch.randn(t, c, d + 1, generator=g, dtype=D64), torch.randn(t, c, d + 1, generator=g, dtype=D64)
    batched = torch.autograd.grad(HeadProblem.build(feats, targets, kind, lam, True, centre).grad_dot(w, v).sum(),
                                  (feats, lam, centre))
    # <d_W g_i(W), V> by autograd with a graph into the features, lambda and the centre (double backward)
    mixed = sum((grad_of(reference_g(kind, feats[i], targets[i], lam[i], True, centre[i]), w[i].clone().requires_grad_(True),
                         create_graph=True)[1] * v[i]).sum() for i in range(t))
    ref = torch.autograd.grad(mixed, (feats, lam, centre))
    for got, want in zip(batched, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("bias", [True, False])
def test_feature_grads_equal_the_double_backward_of_the_mixed_term(kind, bias):
    """The closed form the default form backpropagates (R V + Q W) against <d_W g_i(W), V> differentiated in
    the features by autograd through autograd's own gradient of a plain loss."""
    t, n, c, d = 3, 7, 4, 5
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(t, n, d, generator=g, dtype=D64, requires_grad=True)
    targets = torch.randint(0, c, (t, n), generator=g) if kind == "classification" else torch.randn(t, n, c, generator=g, dtype=D64)
    w, v = torch.randn(t, c, d + bias, generator=g, dtype=D64), torch.randn(t, c, d + bias, generator=g, dtype=D64)
    got = HeadProblem.build(feats.detach(), targets, kind, 0.3, bias).feature_grads(w, v)
    mixed = sum((grad_of(reference_g(kind, feats[i], targets[i], 0.3, bias, None), w[i].clone().requires_grad_(True),
                         create_graph=True)[1] * v[i]).sum() for i in range(t))
    want = torch.autograd.grad(mixed, feats)[0]
    torch.testing.assert_close(got[..., :d], want, rtol=1e-12, atol=1e-12)


def dense_hessian(kind, feats, targets, lam, bias, w0, w):
    """The explicit Hessian of a plain loss + ridge function of W, by autograd (independent of the solver)."""
    def g(wm: torch.Tensor) -> torch.Tensor:
        z = feats @ wm[:, : feats.shape[1]].T + (wm[:, -1] if bias else 0.0)
        loss = F.cross_entropy(z, targets) if kind == "classification" else F.mse_loss(z, targets)
        return loss + 0.5 * lam * (wm - w0).pow(2).sum()
    return hessian(g, w, vectorize=True).reshape(w.numel(), w.numel())


@pytest.mark.parametrize("kind,n,c,d,t", [("classification", 5, 5, 64, 2), ("classification", 100, 20, 64, 1),
                                          ("classification", 12, 4, 6, 3), ("regression", 12, 3, 6, 3),
                                          ("regression", 5, 2, 30, 2)])
@pytest.mark.parametrize("form", ["dual", "primal", "woodbury"])
def test_every_solve_form_equals_the_dense_autograd_hessian_solve(kind, n, c, d, t, form):
    lam = torch.linspace(0.01, 0.5, t, dtype=D64)
    prob, _, w, feats, targets, w0 = stacked(kind, t, n, c, d, True, lam, seed=2)
    b = torch.randn_like(w)
    got = prob.solve(w, b, form=form)
    for i in range(t):
        h = dense_hessian(kind, feats[i], targets[i], lam[i], True, w0[i], w[i])
        ref = torch.linalg.solve(h, b[i].reshape(-1)).reshape(w[i].shape)
        torch.testing.assert_close(got[i], ref, rtol=1e-10, atol=1e-10)


def test_the_cost_rule_picks_woodbury_at_20_way_5_shot_and_dual_at_5_way_1_shot():
    feats = torch.zeros(2, 100, 65, dtype=D64)
    assert HeadProblem(feats, torch.zeros(2, 100, dtype=torch.long), "classification", 0.1).form(20) == "woodbury"
    assert HeadProblem(feats[:, :5], torch.zeros(2, 5, dtype=torch.long), "classification", 0.1).form(5) == "dual"


def test_a_failed_cholesky_row_falls_back_to_lu_without_a_host_read_or_error():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 6, generator=g, dtype=D64)
    m = q @ q.transpose(1, 2) + 0.5 * torch.eye(6, dtype=D64)
    m[1] = m[1] - 3.0 * torch.eye(6, dtype=D64) * m[1].diagonal().max()  # symmetric, indefinite, invertible
    assert torch.linalg.cholesky_ex(m)[1].tolist()[1] != 0 and torch.linalg.eigvalsh(m[1]).abs().min() > 1e-3
    rhs = torch.randn(3, 6, 2, generator=g, dtype=D64)
    for fallback in ("lu", "host", "ldl"):
        torch.testing.assert_close(spd_solve(m, rhs, fallback), torch.linalg.solve(m, rhs), rtol=1e-12, atol=1e-12)


def test_a_task_whose_primal_hessian_is_indefinite_is_solved_by_lu():
    """A negative lambda on one task makes its Hessian indefinite: Cholesky fails on that row only."""
    lam = torch.tensor([0.3, -0.05, 0.2], dtype=D64)
    prob, per_task, w, feats, targets, w0 = stacked("classification", 3, 12, 3, 6, True, lam, seed=4)
    b = torch.randn_like(w)
    for form in ("primal", "woodbury"):
        got = prob.solve(w, b, form=form)
        for i in range(3):
            h = dense_hessian("classification", feats[i], targets[i], lam[i], True, w0[i], w[i])
            if i == 1:
                assert torch.linalg.eigvalsh(h).min() < 0
            torch.testing.assert_close(got[i], torch.linalg.solve(h, b[i].reshape(-1)).reshape(w[i].shape),
                                       rtol=1e-10, atol=1e-10)


def plain_newton(g, w0: torch.Tensor, max_iter: int, tol: float):
    """The rule `newton_heads` states, for one task, written out with Python floats, g's autograd gradient and
    its dense autograd Hessian: stop at ||d g|| <= tol max(1, ||d g(W0)||) or `max_iter` iterations; full
    steps while the slope is below 2 x 64 eps max(1, |g|) and they halve ||d g|| (else: floor); the gradient
    as direction when the slope is not positive; Armijo (1e-4) over t = 1, 1/2, ... (40 trials), else stalled.
    Returns (W, (iterations, ||d g||, capped, stalled, floor))."""
    def vg(w):
        value, grad = grad_of(g, w)
        return float(value.detach()), grad

    x = w0.clone()
    gv, grad = vg(x)
    gnorm = float(grad.norm())
    target, eps = tol * max(1.0, gnorm), 64 * torch.finfo(x.dtype).eps
    it, stalled, floor = 0, False, False
    while gnorm > target and it < max_iter:
        h = hessian(g, x).reshape(x.numel(), x.numel())
        d = torch.linalg.solve(h, grad.reshape(-1)).reshape(x.shape)
        slope = float((grad * d).sum())
        if 0 < slope <= 2 * eps * max(1.0, abs(gv)):
            gn, gradn = vg(x - d)
            if not float(gradn.norm()) <= 0.5 * gnorm:
                floor = True
                break
            x, gv, grad, gnorm, it = x - d, gn, gradn, float(gradn.norm()), it + 1
            continue
        if not slope > 0:
            d, slope = grad, float((grad * grad).sum())
        for k in range(40):
            step = 0.5**k
            gn, gradn = vg(x - step * d)
            if gn <= gv - 1e-4 * step * slope:
                break
        else:
            stalled = True
            break
        x, gv, grad, gnorm, it = x - step * d, gn, gradn, float(gradn.norm()), it + 1
    return x, (it, gnorm, gnorm > target and not (stalled or floor), stalled, floor)


def per_task_newton(per_task, w0, max_iter, tol):
    out = [plain_newton(g, w0[i], max_iter, tol) for i, g in enumerate(per_task)]
    return torch.stack([w for w, _ in out]), [info for _, info in out]


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("t", [1, 4, 7])
@pytest.mark.parametrize("sync_every", [1, 0])
def test_newton_heads_equals_a_plain_newton_per_task_with_uneven_iterations(kind, t, sync_every):
    lam = torch.tensor([0.01, 0.5, 0.003, 0.1, 2.0, 0.02, 0.05][:t], dtype=D64)
    scales = [3.0, 0.5, 1.0, 5.0, 0.2, 2.0, 1.5][:t]
    prob, per_task, w, *_ = stacked(kind, t, 10, 4, 6, True, lam, seed=5, scales=scales)
    w0 = 4 * w
    got, info = newton_heads(prob, w0, max_iter=50, tol=1e-12, sync_every=sync_every)
    ref, infos = per_task_newton(per_task, w0, 50, 1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert info.rows["iterations"].tolist() == [r[0] for r in infos]
    assert info.rows["capped"].tolist() == [r[2] for r in infos] and info.rows["stalled"].tolist() == [r[3] for r in infos]
    torch.testing.assert_close(info.rows["grad_norm"], torch.tensor([r[1] for r in infos], dtype=D64), rtol=1e-3, atol=1e-14)
    if t == 7 and kind == "classification":
        assert len(set(info.rows["iterations"].tolist())) > 2  # the iteration counts are uneven across tasks


def test_newton_heads_caps_each_task_like_a_plain_newton():
    """Capped iterates are not yet contracted onto the solution: the directions must agree to rounding."""
    prob, per_task, w, *_ = stacked("classification", 4, 10, 4, 6, True, torch.tensor([0.01, 0.5, 0.003, 0.1], dtype=D64),
                                    seed=6, scales=[3.0, 0.5, 4.0, 1.0])
    got, info = newton_heads(prob, 4 * w, max_iter=3, tol=1e-12, form="primal")
    ref, infos = per_task_newton(per_task, 4 * w, 3, 1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    assert info.rows["iterations"].tolist() == [r[0] for r in infos] == [3, 3, 3, 3]
    assert info.rows["capped"].tolist() == [r[2] for r in infos] == [True] * 4


def test_newton_heads_float32_ends_at_the_rounding_floor_like_a_plain_newton():
    prob, _, w, feats, targets, _ = stacked("classification", 3, 25, 5, 64, True, 0.01, centre=False, seed=1)
    p32 = HeadProblem(prob.feats.float() * 3, prob.targets, prob.kind, prob.lam)
    got, info = newton_heads(p32, torch.zeros_like(w).float(), max_iter=100, tol=1e-12)
    infos = [plain_newton(reference_g("classification", p32.feats[i], targets[i], 0.01, False, None),
                          torch.zeros_like(w[i]).float(), 100, 1e-12)[1] for i in range(3)]
    assert not info.rows["capped"].any() and info.rows["floor"].all() and not info.rows["stalled"].any()
    assert [r[4] for r in infos] == [True] * 3 and not any(r[2] or r[3] for r in infos)
    assert info.rows["iterations"].tolist() == [r[0] for r in infos]
    assert (info.rows["grad_norm"] < 1e-4).all()


def test_newton_heads_reads_the_host_once_per_iteration_at_most_whatever_t(monkeypatch):
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, _name=name, **kw):
            reads.append(_name)
            return _orig(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for t in (4, 32):
        prob, _, w, *_ = stacked("classification", t, 10, 4, 6, True, torch.full((t,), 0.05, dtype=D64), seed=7)
        for sync_every, bound in ((1, None), (0, 0)):
            reads.clear()
            _, info = newton_heads(prob, 4 * w, max_iter=50, tol=1e-12, sync_every=sync_every)
            count = len(reads)
            most = int(info.iterations.max()) + 1
            assert count <= (most if bound is None else bound), (t, sync_every, count)


def test_head_problem_refuses_misshapen_input_in_one_line():
    feats, y = torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(UsageError, match="lam must be"):
        HeadProblem(feats, y, "classification", torch.ones(3))
    with pytest.raises(UsageError, match=r"feats must be \(T, n, d\+1\)"):
        HeadProblem(feats[0], y, "classification", 0.1)
    with pytest.raises(UsageError, match="form must be one of"):
        HeadProblem(feats, y, "classification", 0.1).solve(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), form="qr")


def test_the_solvers_package_imports_nothing_from_algorithms():
    """The layer sits below the functional core (issue 17, item 4): checked on the source, since
    importing `mrml` itself loads `mrml.algorithms`."""
    import ast
    from pathlib import Path

    import mrml.solvers

    files = sorted(Path(mrml.solvers.__file__).parent.glob("*.py"))
    assert len(files) >= 2
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "algorithms" not in (node.module or "") and not any("algorithms" in a.name for a in node.names), path
            elif isinstance(node, ast.Import):
                assert not any("algorithms" in a.name for a in node.names), path
