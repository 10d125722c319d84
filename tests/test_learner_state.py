"""A learner's state at test time: deterministic evaluation, settings checked on assignment, save and load."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mrml
from mrml import ANIL, MAML, MRML, AlgoConfig, Episode, ProtoNet, load_learner, save_learner
from mrml.config import RunConfig
from mrml.errors import UsageError
from mrml.settings import help_of


class Net(nn.Module):
    """learn2learn's shape, with dropout and a batch norm that tracks running statistics."""

    def __init__(self, width: int = 16, ways: int = 3, p: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(p))
        self.classifier = nn.Linear(width, ways)

    def forward(self, x):
        return self.classifier(self.features(x))


def episode(seed: int, dtype=torch.float64, ways: int = 3) -> Episode:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways)
    return Episode(torch.randn(2 * ways, 4, generator=g, dtype=dtype), y.repeat(2),
                   torch.randn(3 * ways, 4, generator=g, dtype=dtype), y.repeat(3))


def make(algo=MRML, seed: int = 0, dtype=torch.float64, **cfg) -> tuple[Net, mrml.MetaAlgorithm]:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    if algo is ProtoNet:
        return model, algo(model, "classification", AlgoConfig(**cfg), trunk="features")
    return model, algo(model, "classification", AlgoConfig(inner="classifier", **cfg), trunk="features")


def modes(model: nn.Module) -> list[tuple[str, bool]]:
    return [(n, m.training) for n, m in model.named_modules()]


def one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# -- 1. deterministic evaluation -------------------------------------------------------------------
@pytest.mark.parametrize("algo", [MRML, MAML, ANIL, ProtoNet])
def test_evaluate_is_deterministic_with_dropout(algo):
    model, learner = make(algo, inner_steps=3)
    ep = episode(1)
    assert model.training
    with torch.no_grad():  # the dropout is live in the model's own (train) mode
        assert not torch.equal(model(ep.query_x), model(ep.query_x))
    runs = [learner.evaluate(ep) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert torch.equal(learner.adapt(ep), learner.adapt(ep))
    a, b = learner.adapted_parameters(ep), learner.adapted_parameters(ep)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same as the model without dropout: dropout off, batch norm still by the batch's statistics
    torch.manual_seed(0)
    plain = Net(p=0.0).double()
    plain.load_state_dict(model.state_dict())
    again = type(learner)(plain, "classification", learner.config, trunk="features")
    assert again.evaluate(ep) == runs[0]


def test_evaluate_restores_module_modes():
    model, learner = make(MRML)
    model.features[3].eval()  # a mode set by hand (dropout off) stays as set
    model.classifier.eval()
    before = modes(model)
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    ep = episode(2)
    learner.evaluate(ep), learner.adapt(ep), learner.adapted_parameters(ep)
    assert modes(model) == before and bn.track_running_stats
    # evaluation normalises by the batch's statistics and leaves the running ones as they were
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]

    seen = {}

    def fails(*args, **kwargs):
        seen.update(modes(model))
        seen["bn tracks"] = bn.track_running_stats
        raise RuntimeError("inner solve failed")

    learner.adapted_inner = fails
    with pytest.raises(RuntimeError, match="inner solve failed"):
        learner.evaluate(ep)
    assert modes(model) == before and bn.track_running_stats  # restored after the exception too
    assert seen["features.3"] is False and seen["features.1"] is True and seen["bn tracks"] is False
    assert seen["features.0"] is False and seen[""] is False


def test_meta_gradient_keeps_dropout_as_the_user_set_it():
    model, learner = make(MRML)
    ep = episode(3)
    learner.evaluate(ep)
    assert all(training for _, training in modes(model))
    learner.meta_gradient([ep])
    g1 = model.features[0].weight.grad.clone()
    learner.meta_gradient([ep])
    assert not torch.equal(g1, model.features[0].weight.grad)  # dropout on in training (train mode)
    model.eval()  # the user's choice: dropout off (and running statistics) in training too
    learner.meta_gradient([ep])
    g2 = model.features[0].weight.grad.clone()
    learner.meta_gradient([ep])
    assert torch.equal(g2, model.features[0].weight.grad) and not model.training


# -- 2. settings honoured and checked --------------------------------------------------------------
def test_maml_honours_test_steps():
    """MAML adapts at test time with its training loop unless extra test_adaptation='test' (documented)."""
    ep = episode(4)
    assert "maml" in help_of(AlgoConfig, "test_steps") and "--inner-steps" in help_of(AlgoConfig, "test_steps")
    assert "maml" in help_of(AlgoConfig, "test_lr") and "--inner-lr" in help_of(AlgoConfig, "test_lr")
    _, train_loop = make(MAML, inner_steps=3, inner_lr=0.2, test_steps=7)
    _, test_loop = make(MAML, inner_steps=1, test_steps=3, test_lr=0.2, extra={"test_adaptation": "test"})
    _, unadapted = make(MAML, test_steps=0, extra={"test_adaptation": "test"})
    with pytest.warns(UserWarning, match="--test-steps 7 not used"):
        a = train_loop.adapted_parameters(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = test_loop.adapted_parameters(ep)  # test settings in use: no warning
        c = unadapted.adapted_parameters(ep)
        train_loop.adapted_parameters(ep)  # warned once per learner
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = dict(unadapted.model.named_parameters())
    assert all(torch.equal(c[k], init[k]) for k in c)  # test_steps 0: the init itself
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])
    # mrml (gd) uses test_steps at test_lr: 0 steps keep the init
    _, m = make(MRML, inner_solver="gd", implicit="cg", learn_l2=False, l2=0.01, test_steps=0)
    assert torch.equal(m.adapted_parameters(ep)["classifier.weight"], m.model.classifier.weight)
    _, bad = make(MAML, extra={"test_adaptation": "tset"})
    with pytest.raises(UsageError) as e:
        bad.evaluate(ep)
    one_line(e, "test_adaptation", "'tset'")


def test_config_assignment_is_validated():
    _, learner = make(MAML)
    with pytest.raises(UsageError) as built:
        AlgoConfig(inner_steps=-3)
    with pytest.raises(UsageError) as assigned:
        learner.config.inner_steps = -3
    one_line(assigned, "--inner-steps must be >= 0")
    assert str(assigned.value) == str(built.value) and learner.config.inner_steps == 20  # old value kept
    for name, value in [("inner_lr", float("inf")), ("amp", "fp8"), ("warm_start", "yes"), ("extra", [])]:
        with pytest.raises(UsageError):
            setattr(learner.config, name, value)
    with pytest.raises(UsageError) as typo:
        learner.config.inner_stepz = 5
    one_line(typo, "no setting 'inner_stepz'", "'inner_steps'")
    learner.config.inner_steps = 2  # a good value is taken, and used
    assert learner.config.inner_steps == 2 and learner.test_schedule() == (2, learner.config.inner_lr)
    run = RunConfig()  # flat writes into a run's settings are checked the same way
    with pytest.raises(UsageError, match="--inner-steps must be >= 0"):
        run.inner_steps = -3
    assert run.inner_steps == 20


# -- 3. save and load ------------------------------------------------------------------------------
def train_a_little(learner: mrml.MetaAlgorithm, dtype, task_ids=None) -> None:
    opt = torch.optim.Adam(learner.outer_parameters(), lr=0.05)
    for it in range(3):
        learner.meta_gradient([episode(10 + it, dtype), episode(20 + it, dtype)], task_ids)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algo", [MRML, MAML, ProtoNet])
def test_save_load_learner_same_evaluation(tmp_path, algo, dtype):
    model, learner = make(algo, dtype=dtype, inner_steps=3, **({"warm_start": True} if algo is MRML else {}))
    train_a_little(learner, dtype, [0, 1] if algo is MRML else None)
    eps = [episode(100 + i, dtype) for i in range(3)]
    before = [learner.evaluate(ep) for ep in eps]
    path = tmp_path / "learner.pt"
    save_learner(learner, path)
    assert not list(tmp_path.glob(".learner.pt.*"))  # written atomically: no temp file left
    assert isinstance(torch.load(path, weights_only=True), dict)

    fresh, _ = make(algo, seed=1, dtype=dtype)  # the user's own class, built again (other initial weights)
    assert not torch.equal(fresh.features[0].weight, model.features[0].weight)
    loaded = load_learner(path, fresh)
    assert type(loaded) is type(learner) and loaded.config == learner.config and loaded.model is fresh
    after = [loaded.evaluate(ep) for ep in eps]
    assert after == before  # loss and accuracy to the last bit
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    if algo is MRML:
        assert loaded.log_l2 is not None and torch.equal(loaded.log_l2, learner.log_l2) and loaded.l2 != 0.1
        assert loaded._warm.keys() == learner._warm.keys() == {0, 1}
        assert all(torch.equal(loaded._warm[0][0][k], learner._warm[0][0][k]) for k in learner._warm[0][0])
    # saving only the model loses the learned lambda (the case): the evaluation changes
    if algo is MRML:
        _, plain = make(MRML, dtype=dtype, inner_steps=3)
        plain.model.load_state_dict(model.state_dict())
        assert plain.evaluate(eps[0]).loss != before[0].loss


def test_load_learner_refuses_other_model(tmp_path):
    _, learner = make(MRML)
    path = tmp_path / "learner.pt"
    save_learner(learner, path)
    cases = [(Net(width=8).double(), "'features.0.weight' is (8, 4)"),
             (Net().float(), "torch.float32"),
             (nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3)).double(), "has no tensor 'features.0.weight'")]
    for other, needle in cases:
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(UsageError) as e:
            load_learner(path, other)
        one_line(e, "holds a learner over a Net", needle, "build the model as the saved one was")
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # left as it was
    torch.save(learner.model.state_dict(), tmp_path / "weights.pt")  # a plain state_dict is not a learner
    with pytest.raises(UsageError) as e:
        load_learner(tmp_path / "weights.pt", Net().double())
    one_line(e, "not an mrml learner file")
    with pytest.raises(UsageError) as e:
        load_learner(tmp_path / "missing.pt", Net().double())
    one_line(e, "no file")
    with pytest.raises(UsageError) as e:
        save_learner(learner, tmp_path)
    one_line(e, "is a folder")
    # a custom loss is not in the file: loading asks for it, and takes it
    custom = MRML(Net().double(), lambda p, t: F.cross_entropy(p, t, label_smoothing=0.1),
                  AlgoConfig(inner="classifier"), trunk="features")
    save_learner(custom, tmp_path / "custom.pt")
    with pytest.raises(UsageError) as e:
        load_learner(tmp_path / "custom.pt", Net().double())
    one_line(e, "custom loss", "loss=")
    back = load_learner(tmp_path / "custom.pt", Net().double(), custom.loss.fn)
    assert back.evaluate(episode(5)) == custom.evaluate(episode(5))
