"""Exact inner solvers, the closed forms of a linear head, the implicit systems and the learned lambda.

References are written here from torch alone (autograd Hessians, dense solves), float64."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from mrml.algorithms import ANIL, ITDBiO, MRML, AlgoConfig
from mrml.cli import main
from mrml.data.base import episode_rng
from mrml.implicit import conjugate_gradient, neumann_series
from mrml.models import build_model
from mrml.solvers import HeadProblem, newton_heads

D64 = torch.float64


def head_problem(kind: str, n: int, c: int, d: int, bias: bool, lam: float = 0.3, centre: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=D64)
    targets = torch.randint(0, c, (n,), generator=g) if kind == "classification" else torch.randn(n, c, generator=g, dtype=D64)
    p1 = d + bias
    w0 = torch.randn(c, p1, generator=g, dtype=D64) if centre else None
    w = torch.randn(c, p1, generator=g, dtype=D64)
    prob = HeadProblem.build(feats[None], targets[None], kind, lam, bias, None if w0 is None else w0[None])
    return prob, w, feats, targets, w0


def reference_g(kind, feats, targets, lam, bias, w0):
    """g(W) written independently of HeadProblem."""
    def g(w: torch.Tensor) -> torch.Tensor:
        z = feats @ w[:, :feats.shape[1]].T + (w[:, -1] if bias else 0.0)
        loss = F.cross_entropy(z, targets) if kind == "classification" else F.mse_loss(z, targets)
        dw = w - (w0 if w0 is not None else 0.0)
        return loss + 0.5 * lam * dw.pow(2).sum()
    return g


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("n,bias,centre", [(4, True, False), (40, True, True), (6, False, True), (30, False, False)])
def test_linear_head_closed_forms_match_autograd(kind, n, bias, centre):
    """Value, gradient, Hessian products and every solve form (dual, primal, woodbury) of one task (T = 1),
    also with a shifted Hessian H + s I (lambda + s)."""
    c, d = 3, 7
    prob, w, feats, targets, w0 = head_problem(kind, n, c, d, bias, centre=centre)
    g = reference_g(kind, feats, targets, 0.3, bias, w0)
    wr = w.clone().requires_grad_(True)
    value = g(wr)
    (grad,) = torch.autograd.grad(value, wr)
    v, gr = prob.value_grad(w[None])
    torch.testing.assert_close(v[0], value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gr[0], grad, rtol=1e-11, atol=1e-12)
    h = hessian(g, w).reshape(w.numel(), w.numel())
    vec = torch.randn_like(w)
    torch.testing.assert_close(prob.hvp(w[None], vec[None])[0], (h @ vec.reshape(-1)).reshape(w.shape), rtol=1e-10,
                               atol=1e-12)
    for shift in (0.0, 0.7):
        shifted = HeadProblem(prob.feats, prob.targets, kind, 0.3 + shift, prob.centre)
        ref = torch.linalg.solve(h + shift * torch.eye(w.numel(), dtype=D64), vec.reshape(-1)).reshape(w.shape)
        for form in ("dual", "primal", "woodbury"):
            torch.testing.assert_close(shifted.solve(w[None], vec[None], form=form)[0], ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_newton_head_reaches_the_tolerance_from_far(kind):
    prob, w, *_ = head_problem(kind, 10, 4, 6, True, lam=0.01, seed=3)
    w_star, info = newton_heads(prob, 10 * w[None], max_iter=50, tol=1e-12)
    info = info.host()  # one task: the summaries are its figures
    assert info.grad_norm <= 1e-12 * max(1.0, float(prob.value_grad(10 * w[None])[1].norm()))
    assert not info.capped and not info.stalled and info.iterations <= 30 and info.converged
    # the minimiser: a second solve from elsewhere lands on the same point
    w2, _ = newton_heads(prob, torch.zeros_like(w)[None], max_iter=50, tol=1e-12)
    torch.testing.assert_close(w_star, w2, rtol=1e-8, atol=1e-9)


def test_newton_head_float32_stops_at_rounding_not_the_cap():
    """float32 cannot resolve ||d_y g|| = 1e-12: the solve ends near the rounding floor, uncapped."""
    prob, w, *_ = head_problem("classification", 25, 5, 64, True, lam=0.01, seed=1)
    prob32 = HeadProblem(prob.feats.float() * 3, prob.targets, prob.kind, prob.lam)
    w_star, info = newton_heads(prob32, torch.zeros_like(w).float()[None], max_iter=100, tol=1e-12)
    info = info.host()
    assert not info.capped and info.iterations < 30
    assert info.grad_norm < 1e-4


def tiny_setup(tiny, n_eps: int = 2, shots: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("conv4", (1, 16, 16), 3, 4).to(D64)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    eps = [tiny.episode("train", 3, shots, 3, episode_rng(seed, "train", i)).to("cpu", D64) for i in range(n_eps)]
    return model, eps


def grads(algo):
    return torch.cat([p.grad.reshape(-1) for p in algo.outer_parameters() if p.grad is not None])


def test_direct_equals_cg_at_the_exact_inner_solution(tiny):
    out = []
    for implicit, extra in (("direct", {}), ("cg", {"cg_steps": 400, "cg_tol": 1e-15})):
        model, eps = tiny_setup(tiny)
        algo = MRML(model, "classification", AlgoConfig(l2=0.01, implicit=implicit, inner_tol=1e-13, inner_steps=60, **extra))
        stats = algo.meta_gradient(eps)
        assert stats.extra["inner_capped"] == 0 and stats.extra["inner_grad_norm"] < 1e-12
        out.append(grads(algo))
    assert float((out[0] - out[1]).norm() / out[1].norm()) < 1e-8


def test_gd_default_settings_are_far_from_newton_at_small_lambda(tiny):
    """The reason newton is the default: 20 gd steps at lambda = 0.01 leave the implicit formula far off."""
    res = {}
    for solver, implicit in (("newton", "direct"), ("gd", "cg")):
        model, eps = tiny_setup(tiny)
        algo = MRML(model, "classification", AlgoConfig(l2=0.01, inner_solver=solver, implicit=implicit, learn_l2=False))
        algo.meta_gradient(eps)
        res[solver] = grads(algo)
    cos = float(F.cosine_similarity(res["gd"], res["newton"], dim=0))
    assert cos < 0.95, cos


def independent_phi(model, eps, lam: float) -> float:
    """mean f(x, y*(lam)) with y* by dense Newton on the head (torch.autograd.functional.hessian)."""
    total = 0.0
    for ep in eps:
        with torch.no_grad():
            fs, fq = model.backbone(ep.support_x), model.backbone(ep.query_x)
        c, d = model.head.weight.shape

        def g(y: torch.Tensor) -> torch.Tensor:
            w, b = y[: c * d].view(c, d), y[c * d:]
            return F.cross_entropy(fs @ w.T + b, ep.support_y) + 0.5 * lam * y.pow(2).sum()

        y = torch.cat([model.head.weight.detach().reshape(-1), model.head.bias.detach()])
        for _ in range(100):
            yr = y.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(g(yr), yr)
            if gr.norm() < 1e-13:
                break
            y = y - torch.linalg.solve(hessian(g, y), gr)
        w, b = y[: c * d].view(c, d), y[c * d:]
        total += float(F.cross_entropy(fq @ w.T + b, ep.query_y))
    return total / len(eps)


def test_learned_lambda_gradient_matches_finite_differences(tiny):
    model, eps = tiny_setup(tiny)
    lam = 0.05
    algo = MRML(model, "classification", AlgoConfig(l2=lam, learn_l2=True, inner_tol=1e-13, inner_steps=60))
    assert algo.log_l2 is not None and any(p is algo.log_l2 for p in algo.outer_parameters())
    stats = algo.meta_gradient(eps)
    assert stats.extra["l2"] == pytest.approx(lam)
    h = 1e-5
    fd = (independent_phi(model, eps, lam * math.exp(h)) - independent_phi(model, eps, lam * math.exp(-h))) / (2 * h)
    assert float(algo.log_l2.grad) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    # the learned value is checkpointed with the algorithm state
    state = algo.state_dict()
    with torch.no_grad():
        algo.log_l2.fill_(0.0)
    algo.load_state_dict(state)
    assert algo.l2 == pytest.approx(lam)


def test_neumann_series_is_the_truncated_inverse():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=D64)
    a = m @ m.T / 6 + 0.1 * torch.eye(6, dtype=D64)
    b = torch.randn(6, generator=g, dtype=D64)
    alpha = 1.0 / float(torch.linalg.eigvalsh(a).max())
    v, info = neumann_series(lambda x: a @ x, b, alpha, 3)
    i = torch.eye(6, dtype=D64)
    explicit = alpha * (i + (i - alpha * a) + (i - alpha * a) @ (i - alpha * a)) @ b
    torch.testing.assert_close(v, explicit, rtol=1e-12, atol=1e-14)
    v_long, info = neumann_series(lambda x: a @ x, b, alpha, 3000)
    torch.testing.assert_close(v_long, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert info.residual < 1e-8


def test_damped_system_shift(tiny):
    """damped solves (H + delta I) v = d_y f with delta = max(0, 1/(alpha K) - lambda); delta = 0 is cg."""
    for lam, k in ((0.01, 20), (1.0, 20)):
        model, eps = tiny_setup(tiny)
        algo = MRML(model, "classification", AlgoConfig(l2=lam, inner_solver="gd", implicit="damped", inner_steps=k,
                                                        cg_steps=300, cg_tol=1e-14))
        ep = eps[0]
        fs, fq = model.backbone(ep.support_x).detach(), model.backbone(ep.query_x).detach()
        y = algo.solve_inner({}, algo.split.inner_init(), fs, ep.support_y, k, 0.1, None)
        rhs = algo.query_gradient({}, y, fq, ep.query_y)
        v, _ = algo.solve({}, y, fs, ep.support_y, rhs, None)
        delta = max(0.0, 1.0 / (algo.last_inner_lr * k) - lam)
        prob = HeadProblem.build(fs[None], ep.support_y[None], "classification", lam + delta, True)  # H + delta I
        w = algo.head.matrix(y)
        ref = prob.solve(w[None], algo.head.from_flat(rhs, w)[None])[0]
        torch.testing.assert_close(algo.head.from_flat(v, w), ref, rtol=1e-8, atol=1e-10)
        assert (delta > 0) == (lam == 0.01)


def test_newton_is_refused_where_the_method_unrolls_and_without_a_minimiser():
    model = build_model("conv4", (1, 16, 16), 3, 4)
    for cls in (ITDBiO, ANIL):
        with pytest.raises(Exception, match="inner-solver gd"):
            cls(model, "classification", AlgoConfig(inner_solver="newton"))
    with pytest.raises(Exception, match="l2 > 0"):
        MRML(model, "classification", AlgoConfig(l2=0.0))
    with pytest.raises(Exception, match="implicit direct needs"):
        MRML(model, "classification", AlgoConfig(inner="last-block", implicit="direct"))
    with pytest.raises(Exception, match="implicit must be one of"):
        MRML(model, "classification", AlgoConfig(implicit="exact"))
    with pytest.raises(Exception, match="learn-l2 applies to mrml"):
        ITDBiO(model, "classification", AlgoConfig(learn_l2=True))
    with pytest.raises(Exception, match="inner-solver newton or gd"):
        MRML(model, "classification", AlgoConfig(inner_solver="lbfgs"))


def test_cli_solver_options_one_line_errors(capsys):
    assert main(["train", "--inner-solver", "bogus", "--iterations", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inner-solver" in err
    assert main(["train", "--algo", "itd-bio", "--inner-solver", "newton", "--iterations", "0"]) == 2
    assert "gd" in capsys.readouterr().err


def test_train_records_inner_solver_statistics(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "tiny", "--ways", "3", "--shots", "2", "--query", "2", "--backbone", "conv4",
                 "--width", "4", "--iterations", "2", "--log-every", "1", "--val-every", "2", "--val-episodes", "2",
                 "--test-episodes", "2", "--learn-l2", "--no-progress", "--out", str(out)])
    assert code == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("inner_iterations", "inner_grad_norm", "inner_capped", "inner_stalled", "cg_residual", "l2"):
        assert key in rec, key
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["learn_l2"] is True and cfg["inner_solver"] == "newton"  # as the algorithm resolved it
    paper = tmp_path / "paper"
    assert main(["train", "--dataset", "tiny", "--ways", "3", "--shots", "2", "--query", "2", "--width", "4",
                 "--iterations", "1", "--val-episodes", "2", "--test-episodes", "2", "--preset", "paper",
                 "--no-progress", "--out", str(paper)]) == 0
    cfg = json.loads((paper / "config.json").read_text())
    assert cfg["inner_solver"] == "gd" and cfg["implicit"] == "cg"
