"""mrml's meta-trained wider form (`project_head`): its hypergradient against backpropagation through the K steps.

The reference below is written with torch.autograd alone (graph kept over every step, create_graph): the head
solved by Newton iterations differentiated through, then K plain gradient steps on (block, head), then the
query loss, differentiated into the trunk, the block's init and log lambda. It calls nothing of mrml's solvers.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrml import MRML, AlgoConfig, Episode
from mrml.errors import UsageError
from mrml.kstep import k_step_hypergradient

D = torch.float64


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def episodes(n: int, shots: int = 2) -> list[Episode]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(shots)
    return [Episode(torch.randn(3 * shots, 4, generator=g, dtype=D), y, torch.randn(9, 4, generator=g, dtype=D),
                    torch.arange(3).repeat(3)) for _ in range(n)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference(model: nn.Sequential, eps: list[Episode], log_lam: torch.Tensor, steps: int, lr: float,
              ) -> list[torch.Tensor]:
    """Mean over the tasks of d f(y_K) / d (trunk, block init, log lambda) by backpropagation through the steps."""
    w1, b1, phi_w, phi_b = (p for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    x = [w1, b1, phi_w, phi_b, log_lam]
    total = [torch.zeros_like(t) for t in x]
    for ep in eps:
        lam = log_lam.exp()
        fs, fq = torch.tanh(ep.support_x @ w1.T + b1), torch.tanh(ep.query_x @ w1.T + b1)

        def logits(pw, pb, hw, hb, feats):
            return torch.tanh(feats @ pw.T + pb) @ hw.T + hb

        def g(pw, pb, hw, hb):
            reg = hw.pow(2).sum() + hb.pow(2).sum() + (pw - phi_w).pow(2).sum() + (pb - phi_b).pow(2).sum()
            return F.cross_entropy(logits(pw, pb, hw, hb, fs), ep.support_y) + 0.5 * lam * reg

        # the head at the block's init: Newton from 0, differentiated through (converged: the implicit derivative)
        hw = torch.zeros(3, 5, dtype=D, requires_grad=True)
        hb = torch.zeros(3, dtype=D, requires_grad=True)
        for _ in range(30):
            flat = torch.cat([hw.reshape(-1), hb])
            grad = torch.autograd.grad(g(phi_w, phi_b, flat[:15].reshape(3, 5), flat[15:]), flat, create_graph=True)[0]
            hess = torch.stack([torch.autograd.grad(grad[i], flat, create_graph=True)[0] for i in range(18)])
            flat = flat - torch.linalg.solve(hess, grad)
            hw, hb = flat[:15].reshape(3, 5), flat[15:]
        y = [phi_w, phi_b, hw, hb]
        for _ in range(steps):  # K plain gradient steps, graph kept
            grads = torch.autograd.grad(g(*y), y, create_graph=True)
            y = [t - lr * gr for t, gr in zip(y, grads)]
        f = F.cross_entropy(logits(*y, fq), ep.query_y)
        for acc, gr in zip(total, torch.autograd.grad(f, x)):
            acc += gr / len(eps)
    return total


def estimate(learner: MRML, eps: list[Episode]) -> list[torch.Tensor]:
    stats = learner.meta_gradient(eps)
    assert math.isclose(stats.extra["inner_lr"], learner.config.inner_lr)  # no step was halved: plain gradient descent
    m = learner.model
    return [m[0].weight.grad, m[0].bias.grad, m[2].weight.grad, m[2].bias.grad, learner.log_l2.grad]


def test_defaults_match_backpropagation_through_the_k_steps():
    """At the form's defaults (K = 20 steps at 0.1, neumann, lambda learned from 0.1) the flat-memory estimate
    is the K-step hypergradient up to H held at y_K: measured here cosine 0.9983, relative error 6.1%
    (per block of variables cosine >= 0.998; lambda's gradient -0.0282 vs -0.0298)."""
    model = tiny_model()
    learner = MRML(model, "classification", AlgoConfig(inner="last-block", project_head=True))
    cfg = learner.config
    assert (cfg.inner_steps, cfg.inner_lr, cfg.implicit, cfg.learn_l2, cfg.l2) == (20, 0.1, "neumann", True, 0.1)
    eps = episodes(3)
    got = estimate(learner, eps)
    ref = reference(model, eps, learner.log_l2, cfg.inner_steps, cfg.inner_lr)
    g, r = torch.cat([t.reshape(-1) for t in got]), torch.cat([t.reshape(-1) for t in ref])
    assert cosine(g, r) > 0.995
    assert float((g - r).norm() / r.norm()) < 0.1
    for a, b in zip(got, ref):  # every block of variables, lambda included, points the same way
        assert cosine(a.reshape(-1), b.reshape(-1)) > 0.99


@pytest.mark.parametrize("steps, lr, bound", [(1, 0.1, 1e-3), (20, 0.02, 1e-2)])
def test_the_estimate_converges_as_the_path_shortens(steps, lr, bound):
    """H held at y_K is the only approximation: the error shrinks with the path (measured 5e-4 at K = 1, 0.4%
    at K = 20 steps of 0.02, against 6% at the defaults' 20 steps of 0.1)."""
    model = tiny_model()
    learner = MRML(model, "classification", AlgoConfig(inner="last-block", project_head=True, inner_steps=steps,
                                                        inner_lr=lr))
    eps = episodes(3)
    g = torch.cat([t.reshape(-1) for t in estimate(learner, eps)])
    r = torch.cat([t.reshape(-1) for t in reference(model, eps, learner.log_l2, steps, lr)])
    assert float((g - r).norm() / r.norm()) < bound


def test_no_inner_step_is_exact():
    """K = 0: only the head's exact solve lies between the outer variables and f; the estimate is then exact."""
    model = tiny_model()
    learner = MRML(model, "classification", AlgoConfig(inner="last-block", project_head=True, inner_steps=0,
                                                        inner_tol=1e-12))
    eps = episodes(2)
    got = estimate(learner, eps)
    ref = reference(model, eps, learner.log_l2, 0, 0.1)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_neumann_is_exact_on_a_quadratic_inner_loss():
    """g quadratic in y, start y0 depending on x: the Neumann estimate is backpropagation through the K steps."""
    torch.manual_seed(3)
    a = torch.randn(5, 5, dtype=D)
    hess = a @ a.T / 5 + 0.3 * torch.eye(5, dtype=D)
    mix, m0, t = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D), torch.randn(5, dtype=D)
    x = {"s": torch.randn(3, dtype=D, requires_grad=True)}

    def g(x, y, _):
        return 0.5 * y["w"] @ hess @ y["w"] - y["w"] @ (mix @ x["s"]) + x["s"].pow(2).sum() * y["w"].sum()

    def f(x, y, _):
        return 0.5 * (y["w"] - t).pow(2).sum() + (x["s"] * y["w"][:3]).sum()

    steps, lr = 15, 0.2
    grads, info = k_step_hypergradient(g, f, x, {"w": m0 @ x["s"]}, steps=steps, lr=lr)
    y = {"w": m0 @ x["s"]}
    for _ in range(steps):
        y = {"w": y["w"] - lr * torch.autograd.grad(g(x, y, None), y["w"], create_graph=True)[0]}
    (want,) = torch.autograd.grad(f(x, y, None), x["s"])
    assert torch.allclose(grads["s"], want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(info.y["w"], y["w"].detach(), rtol=1e-12, atol=1e-14)


def test_damped_estimate_is_close_at_defaults():
    """The damped system (the ridge proxy of the K steps): measured cosine 0.9967, relative error 8.4%."""
    model = tiny_model()
    learner = MRML(model, "classification", AlgoConfig(inner="last-block", project_head=True, implicit="damped"))
    eps = episodes(3)
    g = torch.cat([t.reshape(-1) for t in estimate(learner, eps)])
    r = torch.cat([t.reshape(-1) for t in reference(model, eps, learner.log_l2, 20, 0.1)])
    assert cosine(g, r) > 0.99
    assert float((g - r).norm() / r.norm()) < 0.15


def test_cg_takes_y_k_as_the_inner_solution():
    """implicit cg: v = H^{-1} d_y f at y_K, so the start's share a0 = d_y f - H v (the reported residual) vanishes."""
    learner = MRML(tiny_model(), "classification", AlgoConfig(inner="last-block", project_head=True, implicit="cg",
                                                              inner_steps=200, l2=1.0))
    stats = learner.meta_gradient(episodes(2))
    assert stats.extra["cg_residual"] < 1e-8
    assert all(torch.isfinite(p.grad).all() for p in learner.model.parameters() if p.grad is not None)


def test_test_time_adaptation_solves_the_head_then_takes_the_steps():
    """adapted_parameters: the head solved at the block's init, then test_steps gradient steps (here 0: the head's
    optimum, gradient zero in the head)."""
    model = tiny_model()
    learner = MRML(model, "classification", AlgoConfig(inner="last-block", project_head=True, test_steps=0,
                                                        inner_tol=1e-12))
    ep = episodes(1)[0]
    adapted = learner.adapted_parameters(ep)
    assert torch.equal(adapted["2.weight"], model[2].weight.detach())
    w, b = adapted["4.weight"].requires_grad_(), adapted["4.bias"].requires_grad_()
    lam = learner.l2
    g = F.cross_entropy(torch.tanh(torch.tanh(ep.support_x @ model[0].weight.T + model[0].bias) @ model[2].weight.T
                                   + model[2].bias) @ w.T + b, ep.support_y) + 0.5 * lam * (w.pow(2).sum() + b.pow(2).sum())
    gw, gb = torch.autograd.grad(g, (w, b))
    assert max(gw.abs().max(), gb.abs().max()) < 1e-10
    learner.config.test_steps = 5
    moved = learner.adapted_parameters(ep)
    assert not torch.equal(moved["2.weight"], model[2].weight.detach())
    assert learner.adapt(ep).shape == (9, 3)


@pytest.mark.parametrize("config, words", [
    (dict(inner="4", project_head=True), "wider than the head"),
    (dict(inner="last-block", project_head=True, implicit="direct"), "neumann"),
    (dict(inner="last-block", project_head=True, inner_solver="newton"), "gd"),
    (dict(inner="last-block", project_head=True, task_chunk=2), "per task"),
    (dict(inner="last-block", project_head=True, warm_start=True), "warm-start"),
    (dict(inner="last-block", project_head=True, l2=0.0, learn_l2=False), "--l2 > 0"),
])
def test_bad_settings_are_one_line(config, words):
    with pytest.raises(UsageError, match=words) as e:
        MRML(tiny_model(), "classification", AlgoConfig(**config))
    assert "\n" not in str(e.value)


def test_other_algorithms_refuse_project_head():
    from mrml import IMAML

    with pytest.raises(UsageError, match="form of mrml"):
        IMAML(tiny_model(), "classification", AlgoConfig(inner="last-block", project_head=True))


def test_outer_parameters_hold_the_block_init_and_lambda():
    learner = MRML(tiny_model(), "classification", AlgoConfig(inner="last-block", project_head=True, prox=False))
    ids = {id(p) for p in learner.outer_parameters()}
    assert id(learner.model[2].weight) in ids and id(learner.log_l2) in ids
    assert math.isclose(learner.l2, 0.1)


TINY = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--inner-steps", "2", "--val-every", "5", "--val-episodes", "1", "--test-episodes", "1", "--no-progress",
        "--inner", "last-block", "--project-head"]


def test_cli_trains_the_form_and_evaluates_it_with_and_without_last_block_adaptation(tmp_path, capsys):
    import json

    import mrml
    from mrml.cli import main
    from conftest import tiny_dataset

    run = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["project_head"], config["inner"]) == (True, "last-block")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("head_iterations" in r for r in records if r.get("split") == "train")
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "2", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--episodes", "2", "--json", "--adapt", "last-block", "--adapt-steps", "2"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["adapt"] == "last-block" and 0 <= tuned["accuracy"] <= 1 and 0 <= head["accuracy"] <= 1
    loaded = mrml.load_run(run)
    assert loaded.learner.projection is not None
    assert loaded.evaluate(tiny_dataset(), episodes=2)["accuracy"] == head["accuracy"]


def test_cli_refuses_the_batched_engine_in_one_line(tmp_path, capsys):
    from mrml.cli import main

    capsys.readouterr()
    assert main(["train", *TINY, "--iterations", "1", "--task-chunk", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--project-head runs per task" in err and "\n" not in err
