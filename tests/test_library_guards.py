"""The library stops where the command line stops (issue 21, item 7): a non-finite loss or gradient is a
one-line NonFiniteError naming the episode (and `.grad` is cleared), and malformed input -- an empty task
list, a bare Episode, task ids that do not match the tasks, empty support or query sets, one-class
classification tasks, shots/query 0, NaN tolerances -- a one-line UsageError."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dataset
from torch import nn

from mrml import ANIL, MAML, MRML, AlgoConfig, Episode
from mrml.data.base import episode_rng
from mrml.errors import NonFiniteError, UsageError
from mrml.implicit import cg_solver, conjugate_gradient

WAYS, SHOTS, QUERY = 3, 2, 2
NAN = float("nan")

# the learners every finiteness case runs on: MRML's default (exact head solve), its task-batched path,
# and two unrolled baselines (base `meta_gradient`)
LEARNERS = {
    "mrml": (MRML, dict(inner="2")),
    "mrml_batched": (MRML, dict(inner="2", task_chunk=2)),
    "anil": (ANIL, dict(inner="2", inner_steps=2)),
    "maml": (MAML, dict(inner_steps=2)),
}


def model(dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, WAYS)).to(dtype)


def learner(name: str, dtype: torch.dtype = torch.float64, loss="classification", **cfg) -> tuple:
    cls, base = LEARNERS[name]
    m = model(dtype)
    with warnings.catch_warnings():  # estimator notes are not what these tests check
        warnings.simplefilter("ignore")
        algo = cls(m, loss, AlgoConfig(**{**base, **cfg}))
    return algo, m


def episode(seed: int, dtype: torch.dtype = torch.float64, shots: int = SHOTS, query: int = QUERY) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return Episode(torch.randn(WAYS * shots, 4, generator=g, dtype=dtype), labels.repeat(shots),
                   torch.randn(WAYS * query, 4, generator=g, dtype=dtype), labels.repeat(query))


def grads(m: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in m.parameters()]


def set_grads(m: nn.Module) -> list[torch.Tensor]:
    """The gradients a step set (a fixed head init has none)."""
    return [g for g in grads(m) if g is not None]


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


# -- non-finite values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LEARNERS))
def test_nan_support_pixel_raises_naming_episode(name):
    algo, m = learner(name)
    eps = [episode(0), episode(1), episode(2)]
    eps[1].support_x[0, 0] = NAN
    with pytest.raises(NonFiniteError) as e:
        algo.meta_gradient(eps, task_ids=["a", "b", "c"])
    msg = one_line(e)
    assert f"{algo.name} meta_gradient" in msg and "episode 1 (task id 'b') of 3" in msg and "support_x" in msg
    assert all(g is None for g in grads(m))  # cleared, not left holding NaN


@pytest.mark.parametrize("name", list(LEARNERS))
def test_nan_query_pixel_raises_naming_episode(name):
    algo, m = learner(name)
    eps = [episode(0), episode(1)]
    eps[0].query_x[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"episode 0 of 2: it holds NaN or infinite values in query_x") as e:
        algo.meta_gradient(eps)
    one_line(e)
    assert all(g is None for g in grads(m))


@pytest.mark.parametrize("name", ["mrml_batched", "maml"])
def test_diverged_inner_loop_with_finite_inputs_raises_naming_episode(name):
    # float32 and a huge inner step without the guard: the query loss overflows
    gd = dict(inner_solver="gd", implicit="cg", learn_l2=False) if name == "mrml_batched" else {}
    algo, m = learner(name, torch.float32, inner_lr=1e30, plain_inner=True, inner_steps=3, **gd)
    with pytest.raises(NonFiniteError) as e:
        algo.meta_gradient([episode(0, torch.float32), episode(1, torch.float32)], task_ids=[7, 8])
    msg = one_line(e)
    assert "non-finite query loss on episode 0 (task id 7) of 2, whose inputs are finite" in msg
    assert all(g is None for g in grads(m))


def nan_gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy whose value stays finite but whose gradient is NaN on query sets of 9 examples."""
    ce = F.cross_entropy(pred, target)
    if target.shape[0] == 9:
        ce = ce + 0 * torch.sqrt(pred.sum() - pred.sum())  # d sqrt(0) = inf, times 0: NaN
    return ce


@pytest.mark.parametrize("name", ["mrml", "anil"])
def test_nonfinite_gradient_with_finite_loss_names_episode(name):
    cls, base = LEARNERS[name]
    m = model()
    algo = cls(m, nan_gradient_loss, AlgoConfig(**base), inner_loss="classification")
    eps = [episode(0), episode(1, query=3), episode(2)]
    with pytest.raises(NonFiniteError) as e:
        algo.meta_gradient(eps)
    msg = one_line(e)
    assert "non-finite meta-gradient on episode 1 of 3, whose inputs are finite" in msg
    assert all(g is None for g in grads(m))


def test_failure_clears_grad_accumulated_by_earlier_calls():
    algo, m = learner("anil")
    algo.meta_gradient([episode(0)], scale=0.5)
    assert all(g is not None and torch.isfinite(g).all() for g in grads(m))  # anil learns the head init
    bad_x = episode(1)
    bad_x.support_x[:] = NAN
    with pytest.raises(NonFiniteError, match="episode 0 of 1"):
        algo.meta_gradient([bad_x], scale=0.5, accumulate=True)
    assert all(g is None for g in grads(m))


def test_nonfinite_grad_before_an_accumulating_call_is_named():
    algo, m = learner("mrml")
    algo.meta_gradient([episode(0)])
    m[0].weight.grad[0, 0] = NAN
    with pytest.raises(NonFiniteError, match=r"held NaN or infinite values before this call \(accumulate=True\)"):
        algo.meta_gradient([episode(1)], accumulate=True)
    assert all(g is None for g in grads(m))


@pytest.mark.parametrize("name", ["mrml", "mrml_batched"])
def test_nonfinite_step_drops_the_warm_starts_of_its_tasks(name):
    algo, m = learner(name, warm_start=True, **({} if name == "mrml_batched" else
                                                 dict(inner_solver="gd", implicit="cg", learn_l2=False)))
    algo.meta_gradient([episode(0), episode(1)], task_ids=["a", "b"])
    assert set(algo._warm) == {"a", "b"}
    bad = episode(1)
    bad.support_x[0, 0] = NAN
    with pytest.raises(NonFiniteError, match="task id 'b'"):
        algo.meta_gradient([episode(0), bad], task_ids=["a", "b"])
    assert set(algo._warm) == {"a"}  # a's solve is finite and kept; b's is dropped
    assert all(torch.isfinite(t).all() for t in [*algo._warm["a"][0].values(), algo._warm["a"][1]])


def test_check_finite_false_leaves_the_check_to_the_caller():
    # what `mrml train` does: it reduces across processes, then checks (and checkpoints) itself
    algo, m = learner("maml")
    bad = episode(0)
    bad.support_x[0, 0] = NAN
    stats = algo.meta_gradient([bad], check_finite=False)
    assert math.isnan(stats.loss) and torch.isnan(m[0].weight.grad).any()


def test_finite_step_is_unchanged_by_the_check():
    algo, m = learner("mrml")
    eps = [episode(0), episode(1)]
    checked = algo.meta_gradient(eps)
    g1 = [g.clone() for g in set_grads(m)]
    unchecked = algo.meta_gradient(eps, check_finite=False)
    assert g1 and checked == unchecked and all(torch.equal(a, b) for a, b in zip(g1, set_grads(m), strict=True))


@pytest.mark.parametrize("name", ["mrml", "maml"])
def test_evaluate_nan_episode_is_one_line(name):
    algo, _ = learner(name)
    ep = episode(0)
    ep.support_x[3, 1] = NAN
    with pytest.raises(NonFiniteError) as e:
        algo.evaluate(ep)
    assert "the episode holds NaN or infinite values in support_x" in one_line(e)


# -- malformed input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mrml", "mrml_batched", "anil"])
def test_meta_gradient_empty_list_is_one_line(name):
    algo, _ = learner(name)
    with pytest.raises(UsageError) as e:
        algo.meta_gradient([])
    assert one_line(e) == "meta_gradient needs at least one episode (got an empty list)"


@pytest.mark.parametrize("name", ["mrml", "mrml_batched", "anil"])
def test_bare_episode_instead_of_a_list_is_one_line(name):
    algo, _ = learner(name)
    with pytest.raises(UsageError) as e:
        algo.meta_gradient(episode(0))
    assert one_line(e) == "meta_gradient takes a list of episodes (got one Episode): pass [episode]"


def test_task_ids_not_a_list_is_one_line():
    algo, _ = learner("mrml")
    with pytest.raises(UsageError, match=r"task_ids must be a list with one id per episode \(got int\)") as e:
        algo.meta_gradient([episode(0)], task_ids=3)
    one_line(e)
    algo.meta_gradient([episode(0), episode(1)], task_ids=np.array([4, 5]))  # any sequence of ids


def test_list_item_not_an_episode_is_one_line():
    algo, _ = learner("mrml")
    ep = episode(0)
    with pytest.raises(UsageError, match="item 1 of the episodes is a tuple, not an Episode") as e:
        algo.meta_gradient([ep, (ep.support_x, ep.support_y, ep.query_x, ep.query_y)])
    one_line(e)


def test_episode_without_tensors_is_one_line():
    algo, _ = learner("mrml")
    ep = episode(0)
    with pytest.raises(UsageError, match=r"episode 0: support_x must be a tensor .* \(got list\)") as e:
        algo.meta_gradient([Episode(ep.support_x.tolist(), ep.support_y, ep.query_x, ep.query_y)])
    one_line(e)
    with pytest.raises(UsageError, match=r"episode 0: query_y must be a tensor \(got list\)"):
        algo.meta_gradient([Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y.tolist())])


@pytest.mark.parametrize("name", ["mrml", "mrml_batched"])
@pytest.mark.parametrize("ids", [["a"], ["a", "b", "c"]])
def test_task_ids_length_mismatch(name, ids):
    algo, m = learner(name, warm_start=True, **({} if name == "mrml_batched" else
                                                 dict(inner_solver="gd", implicit="cg", learn_l2=False)))
    with pytest.raises(UsageError) as e:
        algo.meta_gradient([episode(0), episode(1)], task_ids=ids)
    assert one_line(e) == (f"meta_gradient: task_ids holds {len(ids)} ids for 2 episodes: give one id per episode, "
                           "in the same order (or None)")
    assert algo._warm == {} and all(g is None for g in grads(m))  # nothing ran


def test_empty_support_set_is_one_line():
    algo, _ = learner("mrml")
    ep = episode(0)
    with pytest.raises(UsageError) as e:
        algo.meta_gradient([episode(1), Episode(ep.support_x[:0], ep.support_y[:0], ep.query_x, ep.query_y)])
    assert one_line(e).startswith("episode 1 has an empty support set")


def test_empty_query_set_is_one_line():
    algo, _ = learner("anil")
    ep = episode(0)
    with pytest.raises(UsageError) as e:
        algo.meta_gradient([Episode(ep.support_x, ep.support_y, ep.query_x[:0], ep.query_y[:0])])
    assert one_line(e).startswith("episode 0 has an empty query set")
    with pytest.raises(UsageError, match="the episode has an empty query set"):
        algo.evaluate(Episode(ep.support_x, ep.support_y, ep.query_x[:0], ep.query_y[:0]))


def test_inputs_and_targets_of_different_lengths_is_one_line():
    algo, _ = learner("mrml")
    ep = episode(0)
    with pytest.raises(UsageError, match=r"episode 0: the support inputs and targets disagree .* \[\(6, 4\), \(5,\)\]"):
        algo.meta_gradient([Episode(ep.support_x, ep.support_y[:5], ep.query_x, ep.query_y)])


@pytest.mark.parametrize("name", ["mrml", "mrml_batched", "anil"])
def test_single_class_support_is_one_line(name):
    algo, m = learner(name)
    ep = episode(1)
    one_class = Episode(ep.support_x, torch.zeros_like(ep.support_y), ep.query_x, ep.query_y)
    with pytest.raises(UsageError) as e:
        algo.meta_gradient([episode(0), one_class], task_ids=["a", "b"])
    assert one_line(e) == ("episode 1 (task id 'b'): its support set holds only class 0: a classification task "
                           "needs at least 2 classes (ways >= 2)")
    assert all(g is None for g in grads(m))
    with pytest.raises(UsageError, match="the episode: its support set holds only class 0"):
        algo.evaluate(one_class)


def test_single_class_query_is_allowed():
    # the query set judges the adapted part on whichever classes it holds; the support set must hold >= 2
    algo, m = learner("mrml")
    ep = episode(0)
    stats = algo.meta_gradient([Episode(ep.support_x, ep.support_y, ep.query_x, torch.zeros_like(ep.query_y))])
    assert math.isfinite(stats.loss) and set_grads(m) and all(torch.isfinite(g).all() for g in set_grads(m))


def test_single_value_regression_support_is_allowed():
    # regression targets are values, not classes: one distinct value is a task like any other
    m = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    algo = MRML(m, "regression", AlgoConfig(inner="2"))
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).unsqueeze(1)
    stats = algo.meta_gradient([Episode(x, torch.ones(5, 1, dtype=torch.float64), x, x.sin())])
    assert math.isfinite(stats.loss)


# -- episodes drawn from a dataset ---------------------------------------------------------------------------
def test_episode_shots_zero():
    data = tiny_dataset()
    with pytest.raises(UsageError, match=r"ways, shots and query must be >= 1 \(got ways=3, shots=0, query=2\)") as e:
        data.episode("train", 3, 0, 2, episode_rng(0, "train", 0))
    one_line(e)


def test_episode_query_zero():
    data = tiny_dataset()
    with pytest.raises(UsageError, match=r"\(got ways=3, shots=2, query=0\)") as e:
        data.episode("train", 3, 2, 0, episode_rng(0, "train", 0))
    one_line(e)


@pytest.mark.parametrize("ways", [1, 0])
def test_episode_ways_below_two_for_classification(ways):
    data = tiny_dataset()
    with pytest.raises(UsageError) as e:
        data.episode("train", ways, 2, 2, episode_rng(0, "train", 0))
    msg = one_line(e)
    assert ("ways >= 2" in msg) if ways == 1 else ("must be >= 1" in msg)
    with pytest.raises(UsageError, match="ways >= 2"):
        data.check_episode("train", 1, 2, 2)


def test_episode_valid_shape_unchanged():
    data = tiny_dataset()
    ep = data.episode("train", 2, 3, 1, episode_rng(0, "train", 0))
    assert ep.support_x.shape[0] == 6 and ep.support_y.tolist() == [0, 0, 0, 1, 1, 1] and ep.query_y.tolist() == [0, 1]
    assert torch.equal(ep.support_x, data.episode("train", 2, 3, 1, episode_rng(0, "train", 0)).support_x)


# -- tolerances and the CG information ---------------------------------------------------------------------
@pytest.mark.parametrize("field", ["cg_tol", "inner_tol"])
def test_nan_tolerances_are_one_line(field):
    with pytest.raises(UsageError) as e:
        AlgoConfig(**{field: NAN})
    assert "got nan" in one_line(e)


@pytest.mark.parametrize("tol", [NAN, float("inf"), -1.0])
def test_conjugate_gradient_bad_tol_is_one_line(tol):
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    with pytest.raises(UsageError) as e:
        conjugate_gradient(lambda v: v @ a, torch.ones(2, dtype=torch.float64), tol=tol)
    assert one_line(e) == f"conjugate gradient: tol must be a finite number >= 0 (got {tol!r})"
    with pytest.raises(UsageError):
        cg_solver(tol=tol)


def test_conjugate_gradient_nan_rhs_is_not_converged():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 3.0], [NAN, 1.0]], dtype=torch.float64)  # row 1 holds a NaN
    x, info = conjugate_gradient(lambda v: v @ a, b, tol=1e-12)
    assert not info.converged and math.isnan(info.residual) and info.nonpositive_curvature == 0
    assert info.rows["residual"][0] <= 1e-12 and math.isnan(info.rows["residual"][1])
    assert torch.allclose(x[0], torch.ones(2, dtype=torch.float64))
    _, single = conjugate_gradient(lambda v: v @ a, b[1])
    assert not single.converged and math.isnan(single.residual)


def test_conjugate_gradient_nan_product_stops_the_row_unconverged():
    # a matvec that turns NaN from its second call: the row stops, is not converged, and is not reported as
    # non-positive curvature
    calls = [0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return 2 * v + (NAN if calls[0] > 1 else 0.0)

    b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + torch.tensor([0.0, 0.0, 1e-3], dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: matvec(v) * torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64), b,
                                 max_iter=5, tol=1e-12)
    assert not info.converged and info.nonpositive_curvature == 0 and info.iterations == 2
    assert math.isfinite(info.residual) and info.residual > 1e-12 and torch.isfinite(x).all()


def test_direct_solve_with_nan_rhs_is_not_converged():
    algo, _ = learner("mrml")
    y = {k: v.detach() for k, v in algo.split.inner_init().items()}
    fs = torch.randn(6, 8, dtype=torch.float64)
    rhs = torch.full((sum(t.numel() for t in y.values()),), NAN, dtype=torch.float64)
    _, info = algo.solve({}, y, fs, torch.arange(WAYS).repeat(2), rhs, None)
    assert not info.converged and math.isnan(info.residual)


@pytest.mark.parametrize("name", ["mrml", "maml"])
def test_float64_model_given_float32_episode_is_one_line(name):
    algo, m = learner(name)  # float64
    with pytest.raises(UsageError, match=r"support_x is torch.float32 but the model's parameters are torch.float64") as e:
        algo.meta_gradient([episode(0, torch.float32)])
    one_line(e)
    with pytest.raises(UsageError, match="cast one to the other") as e:
        algo.evaluate(episode(0, torch.float32))
    one_line(e)


def test_a_finite_gradient_whose_sum_overflows_passes_and_an_infinite_one_does_not():
    """The per-task screen sums each gradient; a sum that overflows on finite values is told apart."""
    from mrml.algorithms.base import StepStats
    from mrml.algorithms.guards import FiniteWatch

    algo, m = learner("anil", torch.float32)
    ep = episode(0, torch.float32)
    for bad in (False, True):
        watch = FiniteWatch(algo, [ep], [None], accumulate=False)
        for p in algo.outer_parameters():
            p.grad = torch.full_like(p, 3e38)
        if bad:
            m[0].weight.grad[0, 0] = float("inf")
        watch.done([0])
        assert not bool(watch.groups[0][1])  # the screen fails either way
        if not bad:
            watch.check([StepStats(1.0, None, {})])  # finite after all: no error, .grad kept
            assert all(g is not None for g in grads(m))
        else:
            with pytest.raises(NonFiniteError, match="non-finite meta-gradient on episode 0 of 1"):
                watch.check([StepStats(1.0, None, {})])
