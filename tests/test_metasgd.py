"""MetaSGD: learned per-parameter inner step sizes -- its meta-gradient against an independent reference
(float64), the alphas as outer variables (gradients, optimizer, save/load), and `mrml train --algo metasgd`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mrml
from mrml import AlgoConfig, Episode, MetaSGD, load_learner, save_learner
from mrml.algorithms import ALGORITHMS, build_algorithm
from mrml.cli import main
from mrml.errors import UsageError

DT = torch.float64


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def task(seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(2)
    return Episode(torch.randn(6, 3, generator=g, dtype=DT), y, torch.randn(6, 3, generator=g, dtype=DT), y)


def random_alphas(learner: MetaSGD, seed: int = 2) -> None:
    """Distinct step sizes in [0.05, 0.25): every entry its own."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in learner.alphas.values():
            a.copy_(0.05 + 0.2 * torch.rand(a.shape, generator=g, dtype=DT))


def reference_meta_gradient(net: nn.Sequential, alphas: list[torch.Tensor], ep: Episode, steps: int,
                            first_order: bool) -> list[torch.Tensor]:
    """d f(y_K) / d(init, alphas) with y_{k+1} = y_k - alpha * d_y CE(y_k; support), written out by hand."""
    init = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    al = [a.detach().clone().requires_grad_(True) for a in alphas]

    def forward(ps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = ps
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    y = init
    for _ in range(steps):
        g = F.cross_entropy(forward(y, ep.support_x), ep.support_y)
        grads = torch.autograd.grad(g, y, create_graph=not first_order)
        y = [p - a * gr for p, a, gr in zip(y, al, grads)]
    f = F.cross_entropy(forward(y, ep.query_x), ep.query_y)
    return list(torch.autograd.grad(f, init + al))


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_matches_reference(first_order):
    net, ep = tiny_net(), task()
    learner = MetaSGD(net, "classification", AlgoConfig(inner_steps=2, plain_inner=True, first_order=first_order))
    random_alphas(learner)
    alphas = list(learner.alphas.values())
    assert len({float(a.detach().flatten()[0]) for a in alphas}) == 4  # alphas not all equal
    expect = reference_meta_gradient(net, alphas, ep, 2, first_order)
    learner.meta_gradient([ep])
    got = [p.grad for p in net.parameters()] + [a.grad for a in alphas]
    assert len(got) == len(expect) == len(learner.outer_parameters()) == 8
    for e, g in zip(expect, got):
        assert g is not None and e.abs().max() > 1e-6
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_metasgd_alphas_init_to_inner_lr_and_are_outer_parameters():
    net = tiny_net()
    learner = build_algorithm("metasgd", net, "classification", AlgoConfig(inner_lr=0.3, inner_steps=2))
    assert ALGORITHMS["metasgd"] is MetaSGD and isinstance(learner, MetaSGD)
    assert list(learner.alphas) == [n for n, _ in net.named_parameters()]  # inner "all" by default
    for (_, p), a in zip(net.named_parameters(), learner.alphas.values()):
        assert a.shape == p.shape and a.dtype == p.dtype and bool((a == 0.3).all())
    ids = {id(p) for p in learner.outer_parameters()}
    assert all(id(a) in ids for a in learner.alphas.values())
    before = {k: a.detach().clone() for k, a in learner.alphas.items()}
    opt = torch.optim.SGD(learner.outer_parameters(), lr=0.1)
    stats = learner.meta_gradient([task()])
    opt.step()
    assert stats.extra == {"alpha_scale": 1.0}
    assert all(learner.alphas[k].grad is not None for k in before)
    assert any(not torch.equal(before[k], learner.alphas[k]) for k in before)
    learner.zero_grad()
    assert all(a.grad is None for a in learner.alphas.values())


def test_metasgd_test_time_adaptation_steps_with_the_alphas():
    net, ep = tiny_net(), task()
    learner = MetaSGD(net, "classification", AlgoConfig(inner_steps=2, plain_inner=True))
    random_alphas(learner)
    y = {k: p.detach().clone() for k, p in net.named_parameters()}
    for _ in range(2):
        yr = {k: v.requires_grad_(True) for k, v in y.items()}
        pred = torch.func.functional_call(net, yr, (ep.support_x,))
        grads = torch.autograd.grad(F.cross_entropy(pred, ep.support_y), list(yr.values()))
        y = {k: (v - learner.alphas[k].detach() * g).detach() for (k, v), g in zip(yr.items(), grads)}
    adapted = learner.adapted_parameters(ep)
    for k in y:
        torch.testing.assert_close(adapted[k], y[k], rtol=1e-12, atol=1e-14)


def test_metasgd_alphas_saved_and_loaded(tmp_path):
    net, ep = tiny_net(), task()
    learner = MetaSGD(net, "classification", AlgoConfig(inner_steps=2))
    random_alphas(learner)
    path = tmp_path / "learner.pt"
    save_learner(learner, path)
    loaded = load_learner(path, tiny_net(seed=5))
    assert isinstance(loaded, MetaSGD)
    for k, a in learner.alphas.items():
        assert torch.equal(loaded.alphas[k], a.detach())
    assert torch.equal(loaded.adapt(ep), learner.adapt(ep))
    state = learner.state_dict()
    assert set(state) == {"alphas"}


def test_metasgd_load_state_dict_refuses_other_shapes():
    learner = MetaSGD(tiny_net(), "classification")
    other = MetaSGD(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double(), "classification")
    with pytest.raises(UsageError, match="do not fit this model's inner part") as e:
        learner.load_state_dict(other.state_dict())
    assert "\n" not in str(e.value)


def test_train_metasgd_cli_run_keeps_alphas(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2",
                 "--width", "4", "--inner-steps", "2", "--inner-lr", "0.2", "--val-every", "2", "--val-episodes", "2",
                 "--test-episodes", "3", "--no-progress", "--algo", "metasgd", "--iterations", "2",
                 "--out", str(out)]) == 0
    assert "meta-test accuracy" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["algo"] == "metasgd"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    saved = state["algo"]["alphas"]
    run = mrml.load_run(out)
    assert isinstance(run.learner, MetaSGD) and set(saved) == set(run.learner.alphas)
    for k, a in run.learner.alphas.items():
        assert torch.equal(a.detach(), saved[k])
    assert any(not bool((a == 0.2).all()) for a in saved.values())  # learned by the two outer steps
