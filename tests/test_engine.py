"""One engine (issue 17): the default form (exact head solve, direct system, learned lambda) runs on the
task-batched path as in the per-task loop, and a meta-iteration's host syncs stay within a budget that
does not grow with the meta-batch or the Newton iterations."""
from __future__ import annotations

import warnings

import pytest
import torch

from mrml.algorithms import MRML, AlgoConfig
from mrml.data.base import Episode, episode_rng
from mrml.models import build_model
from mrml.syncs import count_host_syncs


def make(dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    model = build_model("conv4", (1, 16, 16), 3, 4).to(dtype)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no estimator swap, no fallback: the default runs as resolved
        algo = MRML(model, "classification", AlgoConfig(**cfg))
    return model, algo


def uneven_episodes(tiny, n, dtype=torch.float64, shots=2):
    """Episodes whose images are scaled differently, so Newton needs a different count per task."""
    eps = []
    for i in range(n):
        ep = tiny.episode("train", 3, shots, 3, episode_rng(0, "train", i)).to("cpu", dtype)
        s = 0.2 + 1.7 * (i % 4)
        eps.append(Episode(ep.support_x * s, ep.support_y, ep.query_x * s, ep.query_y))
    return eps


def outer_grads(model, algo):
    return torch.cat([p.grad.reshape(-1) for p in algo.outer_parameters() if p.grad is not None])


@pytest.mark.parametrize("tasks", [1, 4, 7])
def test_batched_default_equals_per_task_default(tiny, tasks):
    eps = uneven_episodes(tiny, tasks)
    ref_model, ref = make()
    s0 = ref.meta_gradient(eps)
    model, algo = make(task_chunk=4)
    s1 = algo.meta_gradient(eps)
    cfg = algo.config
    assert (cfg.inner_solver, cfg.implicit, cfg.learn_l2) == ("newton", "direct", True)
    a, b = outer_grads(ref_model, ref), outer_grads(model, algo)
    assert float((a - b).norm()) <= 1e-10 * float(a.norm())
    assert float(algo.log_l2.grad) == pytest.approx(float(ref.log_l2.grad), rel=1e-10, abs=1e-14)
    assert s1.loss == pytest.approx(s0.loss, rel=1e-10)
    assert s1.extra["inner_iterations"] == s0.extra["inner_iterations"]


def test_newton_iterations_are_uneven_across_the_tasks(tiny):
    """The test above is only a test of the masking if the tasks' Newton counts differ."""
    eps = uneven_episodes(tiny, 4)
    _, algo = make()
    counts = {algo.meta_gradient([ep]).extra["inner_iterations"] for ep in eps}
    assert len(counts) >= 2, counts


def test_task_chunk_runs_the_exact_default_without_warning(tiny):
    _, algo = make(torch.float32, task_chunk=8)
    cfg = algo.config
    assert (cfg.inner_solver, cfg.implicit, cfg.learn_l2) == ("newton", "direct", True)
    stats = algo.meta_gradient(uneven_episodes(tiny, 3, torch.float32))
    assert stats.extra["inner_capped"] == 0 and stats.extra["cg_residual"] < 1e-3


#: host syncs a chunk may cost (Newton's convergence checks, the one read of the statistics), and a
#: meta-iteration on top of its chunks
PER_CHUNK, PER_STEP = 4, 2


@pytest.mark.parametrize("form", ["default", "gd"])
@pytest.mark.parametrize("meta_batch", [4, 32])
@pytest.mark.parametrize("chunk", [1, 8])
def test_sync_budget(tiny, form, meta_batch, chunk):
    cfg = {} if form == "default" else {"inner_solver": "gd", "implicit": "cg", "learn_l2": False, "inner_steps": 5}
    _, algo = make(torch.float32, task_chunk=chunk, **cfg)
    eps = [tiny.episode("train", 3, 1, 2, episode_rng(0, "train", i)) for i in range(meta_batch)]
    algo.meta_gradient(eps)  # warm-up: first-use hints
    with count_host_syncs(where=True) as counter:
        algo.meta_gradient(eps)
    chunks = -(-meta_batch // chunk)
    budget = PER_CHUNK * chunks + PER_STEP
    assert counter.total <= budget, (counter.total, budget, counter.by_site.most_common(8))


@pytest.mark.parametrize("implicit", ["cg", "damped", "neumann"])
@pytest.mark.parametrize("learn_l2", [False, True])
def test_batched_gd_forms_equal_per_task(tiny, implicit, learn_l2):
    """Algorithm 1's gd form with each linear system and a learned lambda runs on stacked tasks too (the
    guard's per-task step sizes feed the damped and Neumann systems task by task)."""
    eps = uneven_episodes(tiny, 5)
    cfg = dict(inner_solver="gd", implicit=implicit, learn_l2=learn_l2, inner_steps=8, inner_lr=3.5, l2=0.05,
               cg_steps=30, cg_tol=1e-12)  # a step the guard halves for some tasks, not others
    ref_model, ref = make(**cfg)
    s0 = ref.meta_gradient(eps)
    model, algo = make(task_chunk=3, **cfg)
    s1 = algo.meta_gradient(eps)
    a, b = outer_grads(ref_model, ref), outer_grads(model, algo)
    assert float((a - b).norm()) <= 1e-9 * float(a.norm())
    assert s1.loss == pytest.approx(s0.loss, rel=1e-10)
    assert s1.extra["inner_lr"] == pytest.approx(s0.extra["inner_lr"], rel=1e-12)
    if learn_l2:
        assert float(algo.log_l2.grad) == pytest.approx(float(ref.log_l2.grad), rel=1e-9)


def test_the_guard_halves_some_tasks_step_in_the_gd_form_test(tiny):
    """The test above exercises per-task step sizes only if the guard acted on some tasks and not others."""
    _, algo = make(inner_solver="gd", implicit="damped", learn_l2=False, inner_steps=8, inner_lr=3.5, l2=0.05)
    lrs = {algo.meta_gradient([ep]).extra["inner_lr"] for ep in uneven_episodes(tiny, 5)}
    assert len(lrs) >= 2, lrs


def test_trunk_task_by_task_on_cpu_equals_one_grouped_batch(tiny):
    """`trunk_batching` "auto" (task by task on CPU, the default) and "grouped" (one image-major batch with
    task-wise batch norm, the GPU default) give the same hypergradient."""
    eps = uneven_episodes(tiny, 4)
    grads = []
    for mode in ("auto", "grouped", "tasks"):
        model, algo = make(task_chunk=4, extra={"trunk_batching": mode})
        algo.meta_gradient(eps)
        grads.append(outer_grads(model, algo))
    for g in grads[1:]:
        assert float((g - grads[0]).norm()) <= 1e-10 * float(grads[0].norm())


def test_unknown_trunk_batching_is_one_line(tiny):
    from mrml.errors import UsageError

    _, algo = make(task_chunk=2, extra={"trunk_batching": "groupd"})
    with pytest.raises(UsageError, match="trunk_batching.*auto, grouped, vmap, tasks") as err:
        algo.meta_gradient(uneven_episodes(tiny, 2))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("implicit", ["cg", "damped"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_sync_budget_exact_head_with_cg_systems_and_learned_lambda(tiny, implicit, chunk):
    """The exact head with CG or the damped system (and a learned lambda): CG's host checks start at the
    last solve's count, the damping shift stays a tensor."""
    _, algo = make(torch.float32, task_chunk=chunk, implicit=implicit, learn_l2=True)
    eps = [tiny.episode("train", 3, 1, 2, episode_rng(0, "train", i)) for i in range(8)]
    algo.meta_gradient(eps)
    with count_host_syncs(where=True) as counter:
        algo.meta_gradient(eps)
    budget = PER_CHUNK * (-(-8 // chunk)) + PER_STEP
    assert counter.total <= budget, (counter.total, budget, counter.by_site.most_common(8))
