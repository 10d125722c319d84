"""Test-time adaptation beyond the head: `learner.evaluate(ep, adapt=...)`, `LoadedRun.evaluate(..., adapt=...)`
and `mrml eval --adapt` (mrml.algorithms.finetune)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mrml
from mrml import Episode
from mrml.algorithms import ALGORITHMS, AlgoConfig, build_algorithm
from mrml.algorithms.finetune import DEFAULT_ADAPT_LR, DEFAULT_ADAPT_PROX, DEFAULT_ADAPT_STEPS, adapt_settings
from mrml.cli import main, replace_options
from mrml.data import episode_rng
from mrml.errors import UsageError
from mrml.models import build_model
from mrml.models.split import resolve_inner

from conftest import tiny_dataset

FAST = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "1", "--width", "4",
        "--inner-steps", "2", "--cg-steps", "2", "--val-every", "5", "--val-episodes", "1",
        "--test-episodes", "1", "--no-progress"]
BUILT_IN = ["mrml", "maml", "anil", "itd-bio", "imaml", "protonet", "reptile", "metasgd"]
BATCHED = ["--task-chunk", "2", "--meta-batch", "2"]  # the task-batched engine (mrml and imaml)


def episode(shots: int, seed: int = 0) -> Episode:
    return tiny_dataset().episode("test", 3, shots, 3, episode_rng(seed, "test", 0)).to("cpu", torch.float64)


@pytest.fixture(scope="module")
def trained():
    """An mrml learner (Conv-4, width 4, float64) after 3 meta-steps on tiny 3-way 2-shot episodes."""
    torch.manual_seed(0)
    model = build_model("conv4", (1, 16, 16), 3, width=4).double()
    learner = build_algorithm("mrml", model, "classification")
    opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-2)
    data = tiny_dataset()
    for i in range(3):
        learner.meta_gradient([data.episode("train", 3, 2, 2, episode_rng(1, "train", i)).to("cpu", torch.float64)])
        opt.step()
    learner.zero_grad()
    return learner


def reference_finetune(learner, ep: Episode, part: str, steps: int, lr: float, prox: float) -> torch.Tensor:
    """The fine-tuning written out on the whole model: every step runs the full forward."""
    model = learner.model
    base = {n: p.detach() for n, p in model.named_parameters()}
    base.update(learner.adapted_parameters(ep))
    names = resolve_inner(model, part)
    theta = {n: base[n].clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = learner.support_loss(functional_call(model, {**base, **theta}, (ep.support_x,)), ep.support_y)
        loss = loss + 0.5 * prox * sum((theta[n] - base[n]).pow(2).sum() for n in names)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return functional_call(model, {**base, **theta}, (ep.query_x,))


def test_head_is_todays_result_exactly(trained):
    ep = episode(2)
    assert torch.equal(trained.adapt(ep, "head"), trained.adapt(ep))
    assert trained.evaluate(ep, adapt="head") == trained.evaluate(ep)
    params = {n: p.detach() for n, p in trained.model.named_parameters()}
    expect = functional_call(trained.model, {**params, **trained.adapted_parameters(ep)}, (ep.query_x,))
    assert torch.allclose(trained.adapt(ep), expect, atol=1e-10)


def test_last_block_and_all_change_the_result_and_leave_model_and_grad_alone(trained):
    ep = episode(2)
    model = trained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marks = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = marks[n].clone()
    try:
        head = trained.evaluate(ep)
        for part in ("last-block", "all"):
            stats = trained.evaluate(ep, part, adapt_steps=30, adapt_lr=1e-2)
            assert stats.loss != head.loss and 0 <= stats.accuracy <= 1 and stats.extra == {}
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
            for n, p in model.named_parameters():
                assert torch.equal(p.grad, marks[n]), n
    finally:
        trained.zero_grad()


@pytest.mark.parametrize("part", ["last-block", "all"])
def test_fine_tuning_matches_the_whole_model_reference(trained, part):
    # the frozen stages run once: the same numbers as running the whole model in every step
    ep = episode(2)
    got = trained.adapt(ep, part, adapt_steps=5, adapt_lr=1e-2, adapt_prox=0.5)
    assert torch.allclose(got, reference_finetune(trained, ep, part, 5, 1e-2, 0.5), atol=1e-9)


def test_fine_tuning_is_deterministic(trained):
    ep = episode(2)
    a = trained.evaluate(ep, "last-block", adapt_steps=10)
    assert a == trained.evaluate(ep, "last-block", adapt_steps=10)
    assert torch.equal(trained.adapt(ep, "all", adapt_steps=5), trained.adapt(ep, "all", adapt_steps=5))


def test_zero_steps_give_the_head_result(trained):
    ep = episode(2)
    head = trained.adapt(ep)
    for part in ("last-block", "all"):
        assert torch.allclose(trained.adapt(ep, part, adapt_steps=0), head, atol=1e-10)


def test_a_huge_prox_keeps_the_result_near_the_head(trained):
    ep = episode(2)
    head = trained.adapt(ep)
    free = trained.adapt(ep, "last-block", adapt_steps=30, adapt_lr=1e-2)
    held = trained.adapt(ep, "last-block", adapt_steps=30, adapt_lr=1e-2, adapt_prox=1e8)
    assert (held - head).abs().max() < 0.05 * (free - head).abs().max()


def test_auto_picks_head_at_one_shot(trained):
    ep = episode(1)
    stats = trained.evaluate(ep, "auto", adapt_steps=5)
    assert stats.extra == {"adapt_last_block": 0.0}
    assert (stats.loss, stats.accuracy) == (trained.evaluate(ep).loss, trained.evaluate(ep).accuracy)


def test_auto_gives_the_result_of_its_choice_at_two_shots(trained):
    ep = episode(2)
    stats = trained.evaluate(ep, "auto", adapt_steps=10, adapt_lr=1e-2)
    chosen = "last-block" if stats.extra["adapt_last_block"] == 1.0 else "head"
    other = trained.evaluate(ep, chosen, **({} if chosen == "head" else {"adapt_steps": 10, "adapt_lr": 1e-2}))
    assert (stats.loss, stats.accuracy) == (other.loss, other.accuracy)


def test_a_user_trunk_runs_when_the_part_lies_inside_it():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.classifier = nn.Linear(8, 3)

        def forward(self, x):
            return self.classifier(self.features(x))

    learner = build_algorithm("mrml", Net().double(), "classification", trunk="features")
    y = torch.arange(3).repeat(2)
    ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(9, 4, dtype=torch.float64), y.repeat(2)[:9])
    got = learner.adapt(ep, "all", adapt_steps=5, adapt_lr=1e-2)
    assert torch.allclose(got, reference_finetune(learner, ep, "all", 5, 1e-2, 0.0), atol=1e-10)
    assert not torch.allclose(got, learner.adapt(ep))
    # a Sequential with a trunk and the last block outside it: the trunk's output computed once
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    learner = build_algorithm("anil", seq, "classification", AlgoConfig(inner_steps=2), trunk="0")
    got = learner.adapt(ep, "last-block", adapt_steps=5, adapt_lr=1e-2)
    assert torch.allclose(got, reference_finetune(learner, ep, "last-block", 5, 1e-2, 0.0), atol=1e-10)


def test_protonet_fine_tunes_its_embedding_on_the_prototype_loss():
    torch.manual_seed(0)
    model = build_model("conv4", (1, 16, 16), 3, width=4).double()
    learner = build_algorithm("protonet", model, "classification")
    ep = episode(2)
    head = learner.evaluate(ep)
    tuned = learner.evaluate(ep, "last-block", adapt_steps=10, adapt_lr=1e-2)
    assert tuned.loss != head.loss
    assert torch.allclose(learner.adapt(ep, "last-block", adapt_steps=0), learner.adapt(ep), atol=1e-10)


def test_settings_defaults_and_bad_values(trained):
    assert adapt_settings("all") == adapt_settings("all", DEFAULT_ADAPT_STEPS, DEFAULT_ADAPT_LR, DEFAULT_ADAPT_PROX)
    for bad, needle in [(dict(adapt="block"), "adapt must be one of head, last-block, all, auto"),
                        (dict(adapt="all", steps=-1), "adapt_steps must be >= 0"),
                        (dict(adapt="all", steps=2.0), "adapt_steps must be >= 0"),
                        (dict(adapt="all", lr=0.0), "adapt_lr must be > 0"),
                        (dict(adapt="all", lr=float("inf")), "adapt_lr must be > 0"),
                        (dict(adapt="all", prox=-1.0), "adapt_prox must be >= 0"),
                        (dict(adapt="all", prox=float("nan")), "adapt_prox must be >= 0"),
                        (dict(adapt="head", lr=0.1), "adapt_lr does nothing with adapt head")]:
        with pytest.raises(UsageError, match=needle):
            adapt_settings(**bad)
    with pytest.raises(UsageError, match="adapt_prox must be >= 0"):
        trained.evaluate(episode(1), "all", adapt_prox=-1.0)
    with pytest.raises(UsageError, match="adapt must be one of"):
        trained.adapt(episode(1), "whole")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run (1 iteration) per built-in algorithm, and mrml and imaml on the task-batched engine."""
    out = {}
    for name in [*BUILT_IN, "mrml-batched", "imaml-batched"]:
        algo = name.removesuffix("-batched")
        assert algo in ALGORITHMS
        d = tmp_path_factory.mktemp(name)
        extra = ["--algo", algo, "--iterations", "1", *(BATCHED if name.endswith("-batched") else [])]
        assert main(["train", *replace_options(FAST, extra), "--out", str(d)]) == 0
        out[name] = d
    return out


@pytest.mark.parametrize("name", [*BUILT_IN, "mrml-batched", "imaml-batched"])
def test_cli_eval_adapt_last_block_works_for_every_algorithm(runs, name, capsys):
    capsys.readouterr()
    algo = name.removesuffix("-batched")
    args = ["eval", str(runs[name]), "--episodes", "2", "--json"]
    assert main([*args, "--adapt", "last-block", "--adapt-steps", "3", "--adapt-lr", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["adapt"], out["adapt_steps"], out["adapt_lr"], out["adapt_prox"]) == ("last-block", 3, 0.01, 0.0)
    assert out["algo"] == algo and 0 <= out["accuracy"] <= 1 and "auto_last_block_share" not in out
    assert main(args) == 0
    head = json.loads(capsys.readouterr().out)
    assert (head["adapt"], head["adapt_steps"], head["adapt_lr"], head["adapt_prox"]) == ("head", None, None, None)


def test_run_evaluate_auto_records_the_share_and_head_is_the_default(runs, capsys):
    run = mrml.load_run(runs["mrml"])
    data = tiny_dataset()
    default = run.evaluate(data, episodes=2)
    assert default == run.evaluate(data, episodes=2, adapt="head") and default["adapt"] == "head"
    auto = run.evaluate(data, episodes=2, adapt="auto", adapt_steps=2)  # 1-shot: head on every episode
    assert auto["auto_last_block_share"] == 0.0 and auto["accuracy"] == default["accuracy"]
    two = run.evaluate(data, episodes=2, shots=2, adapt="auto", adapt_steps=2)
    assert two["auto_last_block_share"] in (0.0, 0.5, 1.0) and two["adapt"] == "auto"
    assert main(["eval", str(runs["mrml"]), "--episodes", "2", "--adapt", "auto", "--adapt-steps", "2"]) == 0
    assert "--adapt auto: 2 Adam steps at 0.001, prox 0, last-block in 0% of episodes" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--adapt", "block"], "--adapt must be one of head, last-block, all, auto (got 'block')"),
    (["--adapt", "all", "--adapt-steps", "-1"], "--adapt-steps must be >= 0"),
    (["--adapt", "all", "--adapt-steps", "1.5"], "--adapt-steps: invalid int value"),
    (["--adapt", "all", "--adapt-lr", "0"], "--adapt-lr must be > 0"),
    (["--adapt", "all", "--adapt-lr", "nan"], "--adapt-lr must be > 0"),
    (["--adapt", "all", "--adapt-prox", "-0.5"], "--adapt-prox must be >= 0"),
    (["--adapt", "all", "--adapt-prox", "inf"], "--adapt-prox must be >= 0"),
    (["--adapt", "head", "--adapt-steps", "5"], "--adapt-steps does nothing with --adapt head"),
    (["--adapt-lr", "0.01"], "--adapt-lr does nothing with --adapt head"),
])
def test_cli_bad_adapt_values_are_one_line_exit_2(runs, extra, needle, capsys):
    capsys.readouterr()
    code = main(["eval", str(runs["mrml"]), "--episodes", "1", *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
