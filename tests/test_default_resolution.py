"""One default whatever the model's shape, said when it cannot run, and written down as it ran.

- a learn2learn-shaped model (`self.classifier(self.features(x))`, not a Sequential) without `trunk=`
  is split at its linear head's input (a torch.fx trace, checked again on every call): the exact
  default (newton + direct + learned lambda) runs, with the hypergradient of the `trunk=` path and the
  features run twice per task;
- where a one-linear inner part cannot take the exact default (the forward transforms its output,
  cannot be traced, ties its weights; a custom loss; recompute_features), a one-line UserWarning;
- config.json records the estimator the algorithm resolved, and `--config` reading it back gives the
  same run.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrml import ANIL, MRML, AlgoConfig, ITDBiO, ProtoNet
from mrml.cli import main
from mrml.errors import UsageError
from test_library_api import CNN, CNNWithHidden, WAYS, count_calls, image_episodes, smoothed_cross_entropy

TINY = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--inner-steps", "3", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "3",
        "--log-every", "1", "--seed", "3", "--no-progress"]
EXACT = ("newton", "direct", True)


def resolved(learner) -> tuple:
    cfg = learner.config
    return cfg.inner_solver, cfg.implicit, cfg.learn_l2


def no_warning_made(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make()


def outer_grads(learner) -> list[torch.Tensor]:
    return [p.grad.clone() for p in learner.outer_parameters() if p.grad is not None]


# -- the automatic split at a linear head ------------------------------------------------------------------
def test_learn2learn_shape_without_trunk_runs_exact_default(tiny):
    torch.manual_seed(0)
    model = CNN().double()
    nn.init.normal_(model.classifier.weight, std=0.1)
    twin = copy.deepcopy(model)
    eps = image_episodes(tiny, 3, dtype=torch.float64)
    auto = no_warning_made(lambda: MRML(model, "classification", AlgoConfig(inner="classifier")))
    explicit = MRML(twin, "classification", AlgoConfig(inner="classifier"), trunk="features")
    assert resolved(auto) == resolved(explicit) == EXACT and auto.head is not None and not auto.prox
    calls = count_calls(model.features)
    auto.meta_gradient(eps)
    explicit.meta_gradient(eps)
    assert calls[0] == 2 * len(eps)  # the features run once on support and once on query
    ga, ge = outer_grads(auto), outer_grads(explicit)
    assert len(ga) == len(ge) == len(list(model.features.parameters())) + 1  # trunk + the learned lambda
    for a, e in zip(ga, ge):
        assert float((a - e).norm()) <= 1e-8 * float(e.norm()), float((a - e).norm() / e.norm())
    assert float(ge[0].norm()) > 0
    assert torch.allclose(auto.adapt(eps[0]), explicit.adapt(eps[0]), rtol=1e-10, atol=1e-12)


def test_explicit_trunk_with_layers_before_the_head_runs_exact_default(tiny):
    """trunk="features" where hidden -> tanh -> classifier follow: the features are the classifier's input,
    the same split as without trunk= (identical hypergradients), the trunk still run once per input set."""
    torch.manual_seed(0)
    model = CNNWithHidden().double()
    twin = copy.deepcopy(model)
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    named = no_warning_made(lambda: MRML(model, "classification", AlgoConfig(inner="classifier"), trunk="features"))
    auto = MRML(twin, "classification", AlgoConfig(inner="classifier"))
    assert resolved(named) == resolved(auto) == EXACT and named.split.trunk_name == "features"
    calls = count_calls(model.features)
    named.meta_gradient(eps)
    auto.meta_gradient(eps)
    assert calls[0] == 2 * len(eps) and model.hidden.weight.grad is not None
    for a, e in zip(outer_grads(named), outer_grads(auto)):
        assert torch.equal(a, e)
    chunked = MRML(model, "classification", AlgoConfig(inner="classifier", task_chunk=2), trunk="features")
    assert resolved(chunked) == EXACT  # the task-batched path runs the model's forward per task
    chunked.meta_gradient(eps)
    for a, e in zip(outer_grads(chunked), outer_grads(auto)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [MRML, ANIL, ITDBiO])
def test_automatic_head_split_runs_the_features_twice_per_task_whatever_k(tiny, cls):
    eps = image_episodes(tiny, 2)
    for k in (1, 5, 20):
        torch.manual_seed(0)
        model = CNNWithHidden()  # features -> hidden -> tanh -> classifier: the features are tanh(hidden(...))
        learner = cls(model, "classification", AlgoConfig(inner="classifier", inner_steps=k))
        trunk_calls, hidden_calls = count_calls(model.features), count_calls(model.hidden)
        learner.meta_gradient(eps)
        assert trunk_calls[0] == hidden_calls[0] == 2 * len(eps), (cls.name, k, trunk_calls[0])
        assert model.hidden.weight.grad is not None  # the layer before the head is outer, trained
        learner.adapt(eps[0])
        assert trunk_calls[0] == 2 * len(eps) + 2


def test_protonet_uses_the_network_before_an_automatic_head(tiny):
    model = CNN()
    learner = ProtoNet(model, "classification", AlgoConfig(inner="classifier"))  # no trunk=: the classifier's input
    assert {id(p) for p in learner.outer_parameters()} == {id(p) for p in model.features.parameters()}
    assert learner.adapt(image_episodes(tiny, 1)[0]).shape == (WAYS * 3, WAYS)


# -- where the exact default cannot run: the general path, and one line saying so -----------------------------
class Scaled(CNN):
    def forward(self, x):
        return self.classifier(self.features(x)) * 2.0


class EvalScaled(CNN):
    def forward(self, x):
        out = self.classifier(self.features(x))
        return out if self.training else out / 2.0  # fx traces the mode it runs in: both are traced


class Branching(CNN):
    def forward(self, x):
        f = self.features(x)
        return self.classifier(f if bool(f.sum() > -1e30) else -f)  # data-dependent: fx cannot trace it


class Tied(CNN):
    def __init__(self):
        super().__init__()
        self.mirror = nn.Linear(self.classifier.in_features, WAYS)
        self.mirror.weight = self.classifier.weight

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("model, trunk, loss, cfg, match", [
    (Scaled, None, "classification", {}, r"transforms its output before returning it \(layer 'classifier'\)"),
    (Branching, None, "classification", {}, "could not be traced"),
    (Tied, None, "classification", {}, r"shared with another layer \(mirror.weight\)"),
    (CNN, "features", smoothed_cross_entropy, {}, "need one built-in loss .* \\(got a custom loss\\)"),
    (CNN, None, "classification", {"recompute_features": True}, "recompute_features re-runs the whole network"),
    (Scaled, "features", "classification", {}, r"transforms its output before returning it \(layer 'classifier'\)"),
    (EvalScaled, None, "classification", {}, "transforms its output before returning it"),
], ids=["transformed-output", "untraceable", "tied-weights", "custom-loss", "recompute", "trunk-transformed-output",
        "transformed-in-eval-mode"])
def test_default_estimator_change_is_one_warning(tiny, model, trunk, loss, cfg, match):
    torch.manual_seed(0)
    net = model()
    with pytest.warns(UserWarning, match=match) as record:
        learner = MRML(net, loss, AlgoConfig(inner="classifier", **cfg), trunk=trunk)
    (w,) = [w for w in record if issubclass(w.category, UserWarning)]
    assert "\n" not in str(w.message) and "not the exact default" in str(w.message)
    assert w.filename == __file__  # points at the user's line
    assert resolved(learner) == ("gd", "cg", False) and learner.head is None
    assert learner.meta_gradient(image_episodes(tiny, 1)).loss > 0  # the general path runs
    # the same form asked for explicitly: no warning
    no_warning_made(lambda: MRML(model(), loss, AlgoConfig(inner="classifier", inner_solver="gd", **cfg), trunk=trunk))


def test_inner_layer_followed_by_parameters_is_no_head_and_does_not_warn():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    learner = no_warning_made(lambda: MRML(model, "classification", AlgoConfig(inner="0")))
    assert resolved(learner) == ("gd", "cg", False)


def test_forward_that_leaves_the_traced_form_is_a_usage_error(tiny):
    class Switch(CNN):
        scale: float | None = None

        def forward(self, x):
            out = self.classifier(self.features(x))
            return out if self.scale is None else out * self.scale  # a Python branch: fx saw scale None

    model = Switch()
    learner = MRML(model, "classification", AlgoConfig(inner="classifier"))
    assert resolved(learner) == EXACT
    model.scale = 2.0
    with pytest.raises(UsageError, match="transformed the output of 'classifier' on this input") as err:
        learner.meta_gradient(image_episodes(tiny, 1))
    assert "\n" not in str(err.value)


def test_task_batched_settings_keep_the_stages_and_warn():
    with pytest.warns(UserWarning, match="task-batched path .* cannot split this model at its head's input"):
        learner = MRML(CNN(), "classification", AlgoConfig(inner="classifier", task_chunk=2))
    assert resolved(learner) == ("gd", "cg", False) and learner.split.run_trunk is None


# -- config.json names what ran ---------------------------------------------------------------------------------
def test_config_json_records_resolved_estimator(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["inner_solver"], cfg["implicit"], cfg["learn_l2"]) == EXACT
    assert cfg["inner"] == "head" and cfg["l2"] == 0.1 and cfg["prox"] is False
    paper = tmp_path / "paper"
    assert main(["train", *TINY, "--iterations", "1", "--task-chunk", "2", "--out", str(paper)]) == 0
    cfg = json.loads((paper / "config.json").read_text())
    assert (cfg["inner_solver"], cfg["implicit"], cfg["learn_l2"], cfg["task_chunk"]) == (*EXACT, 2)  # issue 17
    capsys.readouterr()


def test_resolved_config_roundtrip(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(a)]) == 0
    assert main(["train", "--config", str(a / "config.json"), "--iterations", "2", "--out", str(b)]) == 0
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca.pop("out") == str(a) and cb.pop("out") == str(b) and ca == cb
    la, lb = ([(r["split"], r["iteration"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (a, b))
    assert la == lb and len([r for r in la if r[0] == "train"]) == 2
    capsys.readouterr()
