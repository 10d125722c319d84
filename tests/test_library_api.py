"""The library API with a user's own model, loss and data: an explicit trunk (`trunk=`), any loss
callable, nested (dict) inputs, `adapted_parameters` and `meta_gradient(accumulate=True)`."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mrml import ANIL, FOMAML, IMAML, MAML, MRML, AlgoConfig, Episode, ITDBiO, ProtoNet, Reptile, build_algorithm
from mrml.data.base import episode_rng
from mrml.errors import UsageError
from mrml.models import build_model

WAYS = 3


# -- a learn2learn-shaped CNN: `features` a custom module (not an nn.Sequential), `classifier` a Linear --
class ConvFeatures(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)


class CNN(nn.Module):
    def __init__(self, ways: int = WAYS, width: int = 8, size: int = 16):
        super().__init__()
        self.features = ConvFeatures(width)
        self.classifier = nn.Linear(width * (size // 4) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNNWithHidden(CNN):
    """The rest of the model is more than one linear layer: the general (non closed-form) path."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(self.classifier.in_features, 6)
        self.classifier = nn.Linear(6, WAYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.hidden(self.features(x.view(-1, 1, 16, 16)))))


def smoothed_cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy, as a plain function (the loss a user brings)."""
    logp = pred.log_softmax(-1)
    return -(0.9 * logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) + 0.1 * logp.mean(-1)).mean()


def image_episodes(tiny, count: int, start: int = 0, shots: int = 2, dtype=torch.float32) -> list[Episode]:
    return [tiny.episode("train", WAYS, shots, 3, episode_rng(0, "train", start + i)).to("cpu", dtype)
            for i in range(count)]


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def mean_eval(learner, eps: list[Episode]) -> tuple[float, float]:
    stats = [learner.evaluate(ep) for ep in eps]
    return float(np.mean([s.loss for s in stats])), float(np.mean([s.accuracy for s in stats]))


def meta_train(learner, eps: list[Episode], steps: int, lr: float, batch: int = 2) -> None:
    opt = torch.optim.Adam(learner.outer_parameters(), lr=lr)
    for i in range(steps):
        learner.meta_gradient([eps[(i * batch + j) % len(eps)] for j in range(batch)])
        opt.step()


# -- (a) explicit trunk + custom loss ----------------------------------------------------------------
def test_learn2learn_shaped_cnn_with_custom_loss_meta_trains(tiny):
    torch.manual_seed(0)
    model = CNN()
    learner = MRML(model, smoothed_cross_entropy, AlgoConfig(inner="classifier", inner_steps=5), trunk="features")
    assert learner.head is None  # a custom loss: no closed forms, Algorithm 1's gd + CG form
    train, held = image_episodes(tiny, 16), image_episodes(tiny, 8, start=1000)
    loss0, acc0 = mean_eval(learner, held)
    meta_train(learner, train, steps=30, lr=3e-3)
    loss1, acc1 = mean_eval(learner, held)
    assert loss1 < loss0 - 0.2, (loss0, loss1)
    assert acc1 > 1 / WAYS + 0.25, (acc0, acc1)


@pytest.mark.parametrize("cls", [MRML, ANIL, ITDBiO, IMAML])
def test_trunk_runs_twice_per_task_whatever_k(tiny, cls):
    eps = image_episodes(tiny, 2)
    for k in (1, 5, 20):
        torch.manual_seed(0)
        model = CNN()
        learner = cls(model, smoothed_cross_entropy, AlgoConfig(inner="classifier", inner_steps=k), trunk="features")
        calls = count_calls(model.features)
        learner.meta_gradient(eps)
        assert calls[0] == 2 * len(eps), (cls.name, k, calls[0])
        learner.adapt(eps[0])
        assert calls[0] == 2 * len(eps) + 2


def test_trunk_given_as_module_and_closed_form_head_detected():
    model = CNN()
    learner = MRML(model, "classification", AlgoConfig(inner="classifier"), trunk=model.features)
    assert learner.head is not None and learner.config.inner_solver == "newton"  # the exact head solve applies
    assert learner.split.trunk is model.features
    # with no inner spec, everything outside the trunk adapts
    learner = MRML(model, "classification", trunk="features")
    assert sorted(learner.split.model_name.values()) == ["classifier.bias", "classifier.weight"]
    assert learner.head is not None
    # a different inner loss, or a callable: no closed forms
    assert MRML(model, "classification", trunk="features", inner_loss=smoothed_cross_entropy).head is None


def test_dotted_trunk_name_reaches_a_nested_module(tiny):
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = CNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Outer()
    learner = MRML(model, "classification", AlgoConfig(inner="net.classifier"), trunk="net.features")
    assert learner.head is not None and learner.split.trunk is model.net.features
    calls = count_calls(model.net.features)
    learner.meta_gradient(image_episodes(tiny, 2))
    assert calls[0] == 4 and model.net.features.conv1.weight.grad is not None


def test_explicit_trunk_gives_the_automatic_splits_hypergradient(tiny):
    """The same network as a FewShotNet (automatic stages) and as a custom module with trunk=...:
    identical meta-gradients and adapted predictions (float64)."""
    torch.manual_seed(0)
    net = build_model("conv4", (1, 16, 16), WAYS, 4).double()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = copy.deepcopy(net.backbone)
            self.out = copy.deepcopy(net.head)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.body(x))

    wrapped = Wrapped()
    nn.init.normal_(net.head.weight, std=0.1)
    with torch.no_grad():
        wrapped.out.weight.copy_(net.head.weight)
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    cfg = AlgoConfig(inner_steps=10, inner_solver="gd", implicit="cg", cg_tol=1e-14)
    auto = MRML(net, "classification", cfg)
    mine = MRML(wrapped, "classification", AlgoConfig(**{**cfg.to_dict(), "inner": "out"}), trunk="body")
    auto.meta_gradient(eps)
    mine.meta_gradient(eps)
    assert net.head.weight.grad is None and wrapped.out.weight.grad is None  # the fixed head init: no gradient
    for (_, p), (_, q) in zip(net.backbone.named_parameters(), wrapped.body.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert torch.allclose(auto.adapt(eps[0]), mine.adapt(eps[0]), rtol=1e-10, atol=1e-13)


def test_custom_loss_equal_to_builtin_gives_same_hypergradient(tiny):
    torch.manual_seed(0)
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    cfg = AlgoConfig(inner="classifier", inner_steps=10, inner_solver="gd", implicit="cg", cg_tol=1e-14)
    grads = []
    for loss in ("classification", F.cross_entropy):
        torch.manual_seed(0)
        model = CNN().double()
        learner = MRML(model, loss, cfg, trunk="features")
        stats = learner.meta_gradient(eps)
        grads.append([p.grad.clone() for p in learner.outer_parameters()])
        assert stats.accuracy is not None  # reported for the callable too (logits and integer labels)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_inner_loss_is_the_data_term_of_g(tiny):
    """g = 2 CE + (lam/2)||y||^2 stepped at alpha has the iterates of CE + (lam/4)||y||^2 stepped at 2 alpha,
    and the implicit hypergradient is invariant to scaling g: the same meta-gradient (float64)."""
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    grads = []
    for inner_loss, l2, lr in ((lambda p, t: 2.0 * F.cross_entropy(p, t), 0.2, 0.05), (None, 0.1, 0.1)):
        torch.manual_seed(0)
        model = CNN().double()
        cfg = AlgoConfig(inner="classifier", inner_steps=10, inner_lr=lr, l2=l2, learn_l2=False, inner_solver="gd",
                         implicit="cg", cg_steps=50, cg_tol=1e-14)
        learner = MRML(model, F.cross_entropy, cfg, trunk="features", inner_loss=inner_loss)
        learner.meta_gradient(eps)
        grads.append([p.grad.clone() for p in learner.outer_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_build_algorithm_passes_trunk_and_inner_loss():
    learner = build_algorithm("anil", CNN(), "classification", AlgoConfig(inner="classifier"), trunk="features",
                              inner_loss=smoothed_cross_entropy)
    assert learner.split.trunk_name == "features" and learner.support_loss.fn is smoothed_cross_entropy


# -- (b) nested (dict) inputs ---------------------------------------------------------------------------
class MaskedMeanEncoder(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextClassifier(nn.Module):
    def __init__(self, ways: int = WAYS):
        super().__init__()
        self.encoder = MaskedMeanEncoder()
        self.head = nn.Linear(16, ways)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(batch))


def text_episode(seed: int, shots: int = 4, query: int = 4, classes: int = 6, vocab: int = 40) -> Episode:
    """Each of `classes` topics owns 6 keyword tokens; a sentence is 3 keywords of its topic among
    random tokens, padded to length 12 (attention mask 0 on the padding). Episodes draw WAYS topics."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randperm(classes, generator=g)[:WAYS]

    def sentences(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = torch.arange(WAYS).repeat_interleave(n)
        ids = torch.randint(classes * 6, vocab, (len(labels), 12), generator=g)
        keys = topics[labels].unsqueeze(1) * 6 + torch.randint(0, 6, (len(labels), 3), generator=g)
        ids[:, :3] = keys
        length = torch.randint(6, 13, (len(labels),), generator=g)
        mask = (torch.arange(12).unsqueeze(0) < length.unsqueeze(1)).long()
        return {"input_ids": ids * mask, "attention_mask": mask}, labels

    sx, sy = sentences(shots)
    qx, qy = sentences(query)
    return Episode(sx, sy, qx, qy)


def test_dict_input_text_model_meta_trains_with_trunk_twice_per_task():
    torch.manual_seed(0)
    model = TextClassifier()
    learner = MRML(model, "classification", AlgoConfig(inner="head"), trunk="encoder")
    assert learner.head is not None  # encoder -> Linear head: the closed forms apply
    calls = count_calls(model.encoder)
    train, held = [text_episode(i) for i in range(20)], [text_episode(1000 + i) for i in range(8)]
    loss0, acc0 = mean_eval(learner, held)
    calls[0] = 0
    learner.meta_gradient(train[:3])
    assert calls[0] == 6
    meta_train(learner, train, steps=30, lr=3e-2)
    loss1, acc1 = mean_eval(learner, held)
    assert loss1 < loss0 - 0.2, (loss0, loss1)
    assert acc1 > max(acc0, 1 / WAYS + 0.25), (acc0, acc1)
    moved = held[0].to("cpu", torch.float64)
    assert moved.query_x["input_ids"].dtype == torch.long and moved.query_x["attention_mask"].dtype == torch.long


@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, ITDBiO, Reptile])
def test_dict_inputs_with_the_automatic_split(cls):
    """Without a trunk the whole model is the adapted part: dict inputs reach its forward."""
    torch.manual_seed(0)
    model = TextClassifier()
    learner = cls(model, "classification", AlgoConfig(inner="head", inner_steps=2))
    stats = learner.meta_gradient([text_episode(0), text_episode(1)])
    assert np.isfinite(stats.loss) and any(p.grad is not None for p in model.parameters())
    assert learner.adapt(text_episode(2)).shape == (WAYS * 4, WAYS)


# -- (c) one-line usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "classifcation"}, "unknown loss 'classifcation': expected 'classification', 'regression'"),
    ({"loss": 3}, "loss must be 'classification', 'regression', a TaskLoss, or a callable"),
    ({"inner_loss": "regresion"}, "unknown inner_loss 'regresion'"),
    ({"trunk": "feature"}, "trunk 'feature' is not a submodule of CNN .its children: features, classifier"),
    ({"trunk": nn.Linear(2, 2)}, "the trunk module .Linear. is not a submodule of CNN"),
    ({"trunk": "features", "inner": "features.conv1"}, "inner part 'features.conv1' includes parameters of the trunk"),
    ({"trunk": "features", "inner": "all"}, "inner part 'all' includes parameters of the trunk 'features'"),
    ({"trunk": "features", "inner": "nothing"}, "inner part 'nothing' names no parameter: .* such as 'classifier'"),
    ({"trunk": "features", "recompute_features": True}, "recompute_features"),
])
def test_bad_input_is_a_one_line_usage_error(kwargs, match):
    kwargs = dict(kwargs)
    cfg = AlgoConfig(inner=kwargs.pop("inner", "classifier"), recompute_features=kwargs.pop("recompute_features", False))
    with pytest.raises(UsageError, match=match) as err:
        MRML(CNN(), kwargs.pop("loss", "classification"), cfg, **kwargs)
    assert "\n" not in str(err.value)


def test_loss_must_return_a_scalar(tiny):
    learner = ANIL(CNN(), lambda p, t: F.cross_entropy(p, t, reduction="none"), AlgoConfig(inner="classifier"),
                   trunk="features")
    with pytest.raises(UsageError, match="the loss must return a scalar tensor .got shape .6,.."):
        learner.meta_gradient(image_episodes(tiny, 1))


def test_forward_using_its_input_beyond_the_trunk_meta_trains(tiny):
    """The rest of the forward reads the input (it does not depend on the inner parameters): the trunk
    still runs twice per task, the hypergradient that of the whole model adapted without trunk=."""
    class Skip(CNNWithHidden):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.tanh(self.hidden(self.features(x)))) + x.mean()

    torch.manual_seed(0)
    model = Skip().double()
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    learner = ANIL(model, "classification", AlgoConfig(inner="classifier", inner_steps=3), trunk="features")
    calls = count_calls(model.features)
    learner.meta_gradient(eps)
    assert calls[0] == 2 * len(eps)
    named = [p.grad.clone() for p in model.parameters()]
    ANIL(model, "classification", AlgoConfig(inner="classifier", inner_steps=3)).meta_gradient(eps)
    for a, e in zip(named, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_trunk_called_twice_or_never_is_a_usage_error(tiny):
    class Twice(CNNWithHidden):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.tanh(self.hidden(self.features(x) + self.features(x))))

    class Never(CNNWithHidden):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.tanh(self.hidden(x.flatten(1)[:, : self.hidden.in_features])))

    ep = image_episodes(tiny, 1)
    with pytest.raises(UsageError, match="called the trunk 'features' 2 times"):
        ANIL(Twice(), "classification", AlgoConfig(inner="classifier"), trunk="features").meta_gradient(ep)
    with pytest.raises(UsageError, match="never called the trunk 'features'"):
        ANIL(Never(), "classification", AlgoConfig(inner="classifier"), trunk="features").meta_gradient(ep)


# -- (d) adapted parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: MRML(CNN().double(), "classification", AlgoConfig(inner="classifier"), trunk="features"),
    lambda: MRML(CNNWithHidden().double(), smoothed_cross_entropy, AlgoConfig(inner="classifier"), trunk="features"),
    lambda: ITDBiO(CNNWithHidden().double(), "classification", AlgoConfig(inner="hidden,classifier"), trunk="features"),
    lambda: ANIL(build_model("conv4", (1, 16, 16), WAYS, 4).double(), "classification", AlgoConfig(inner_steps=3)),
    lambda: MAML(build_model("mlp", (256,), WAYS, 8).double(), "classification", AlgoConfig(inner_steps=2)),
], ids=["mrml-head", "mrml-rest", "itd-bio-two-layers", "anil-auto", "maml-all"])
def test_adapted_parameters_run_the_adapted_model(tiny, make):
    torch.manual_seed(0)
    learner = make()
    model = learner.model
    ep = image_episodes(tiny, 1, dtype=torch.float64)[0]
    if learner.name == "maml":  # the MLP takes flat inputs
        ep = Episode(ep.support_x.flatten(1), ep.support_y, ep.query_x.flatten(1), ep.query_y)
    adapted = learner.adapted_parameters(ep)
    params = dict(model.named_parameters())
    inner = {learner.split.model_name[n] for n in learner.split.inner_names}
    assert set(adapted) == inner
    for k, v in adapted.items():
        assert v.shape == params[k].shape and not v.requires_grad
    assert any(not torch.equal(v, params[k]) for k, v in adapted.items())  # it adapted
    expected = functional_call(model, {**params, **adapted}, (ep.query_x,))
    assert torch.allclose(learner.adapt(ep), expected, rtol=1e-12, atol=1e-12)


def test_protonet_adapts_no_parameters(tiny):
    learner = ProtoNet(CNN(), "classification", trunk="features")
    ep = image_episodes(tiny, 1)[0]
    assert learner.adapted_parameters(ep) == {}
    assert learner.adapt(ep).shape == (WAYS * 3, WAYS)


# -- (e) gradient accumulation ----------------------------------------------------------------------------
ACCUMULATING = [ANIL, ITDBiO, MAML, Reptile, ProtoNet, MRML, IMAML]


@pytest.mark.parametrize("cls", ACCUMULATING, ids=lambda c: c.name)
def test_accumulate_twice_is_twice_once(tiny, cls):
    torch.manual_seed(0)
    model = CNN().double()
    learner = cls(model, "classification", AlgoConfig(inner="classifier", inner_steps=3), trunk="features")
    eps = image_episodes(tiny, 2, dtype=torch.float64)
    learner.meta_gradient(eps)
    once = [None if p.grad is None else p.grad.clone() for p in learner.outer_parameters()]
    assert any(g is not None for g in once)
    learner.meta_gradient(eps, accumulate=True)
    for p, g in zip(learner.outer_parameters(), once):
        assert (p.grad is None) if g is None else torch.allclose(p.grad, 2 * g, rtol=1e-12, atol=1e-15)
    learner.meta_gradient(eps)  # without accumulate: replaced, not added
    for p, g in zip(learner.outer_parameters(), once):
        assert (p.grad is None) if g is None else torch.allclose(p.grad, g, rtol=1e-12, atol=1e-15)


def test_task_batched_path_runs_an_explicit_trunk_per_task(tiny):
    """task_chunk > 1 runs trunk= through the model's forward task by task: the per-task hypergradient."""
    torch.manual_seed(0)
    model = CNN().double()
    eps = image_episodes(tiny, 4, dtype=torch.float64)
    cfg = dict(inner="classifier", inner_solver="gd", implicit="cg", learn_l2=False, cg_tol=1e-14)
    MRML(model, "classification", AlgoConfig(**cfg), trunk="features").meta_gradient(eps)
    per_task = [p.grad.clone() for p in model.features.parameters()]
    calls = count_calls(model.features)
    MRML(model, "classification", AlgoConfig(task_chunk=2, **cfg), trunk="features").meta_gradient(eps)
    assert calls[0] == 2 * len(eps)
    for a, e in zip(per_task, [p.grad for p in model.features.parameters()]):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


class _FlattenNet(nn.Module):
    """A forward that reshapes the trunk's output before the classifier: not a bare linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4, WAYS)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_a_forward_that_reshapes_the_features_is_not_taken_for_a_bare_linear_head():
    torch.manual_seed(0)
    labels = torch.arange(WAYS)
    ep = Episode(torch.randn(2 * WAYS, 1, 8, 8, dtype=torch.float64), labels.repeat(2),
                 torch.randn(2 * WAYS, 1, 8, 8, dtype=torch.float64), labels.repeat(2))
    model = _FlattenNet().double()
    learner = MRML(model, "classification", AlgoConfig(inner="classifier"), trunk="features")
    # not a bare head on the trunk's output: the split is at the classifier's input (the flattened features)
    assert learner.head is not None and learner.split.features(ep.query_x).shape == (2 * WAYS, 4)
    stats = learner.meta_gradient([ep])
    assert math.isfinite(stats.loss)
    pred = learner.adapt(ep)
    adapted = learner.adapted_parameters(ep)
    params = {**dict(model.named_parameters()), **adapted}
    assert torch.allclose(pred, functional_call(model, params, (ep.query_x,)))


class _DictEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(2, 8)

    def forward(self, d):
        return torch.tanh(self.a(d["a"]) + self.b(d["b"]))


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = _DictEncoder(), nn.Linear(8, WAYS)

    def forward(self, d):
        return self.head(self.enc(d))

    def stages(self):
        return [("enc", self.enc), ("head", self.head)]


def test_dict_inputs_through_a_trunk_per_task_and_task_batched_agree():
    torch.manual_seed(0)

    def batch(n):
        return {"a": torch.randn(n, 4, dtype=torch.float64), "b": torch.randn(n, 2, dtype=torch.float64)}

    labels = torch.arange(WAYS).repeat(2)
    eps = [Episode(batch(2 * WAYS), labels, batch(2 * WAYS), labels) for _ in range(3)]
    models = [_DictNet().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    out = []
    for chunk, model in zip((1, 3), models):
        cfg = AlgoConfig(inner="head", inner_solver="gd", implicit="cg", learn_l2=False, task_chunk=chunk)
        MRML(model, "classification", cfg).meta_gradient(eps)
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert out[0].abs().sum() > 0
    assert torch.allclose(out[0], out[1], rtol=1e-10, atol=1e-12)
