"""Algorithm 1 on a tiny conv net: finite differences, memory constant in K, reproducibility."""
from __future__ import annotations

import numpy as np
import torch

from mrml.algorithms import MRML, AlgoConfig
from mrml.data.base import episode_rng
from mrml.memory import PeakMemoryMeter
from mrml.models import build_model
from mrml.reference import objective


def tiny_net(seed: int = 0, width: int = 2, dtype=torch.float64):
    torch.manual_seed(seed)
    model = build_model("conv4", (1, 16, 16), 3, width).to(dtype)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a non-trivial head init
    return model


def test_exact_hypergradient_finite_differences_tiny_conv(tiny):
    """Algorithm 1 with y_K = y* (K large, lam = 1) against central differences of Phi(x) = mean f(x, y*(x)),
    y* from the independent reference (`mrml.reference`: Newton, none of mrml's inner loop)."""
    model = tiny_net()
    cfg = AlgoConfig(inner_steps=200, inner_lr=0.5, l2=1.0, cg_steps=100, cg_tol=1e-14, inner_solver="gd", implicit="cg")
    algo = MRML(model, "classification", cfg)
    eps_ = [tiny.episode("train", 3, 2, 3, episode_rng(0, "train", i)).to("cpu", torch.float64) for i in range(2)]
    algo.meta_gradient(eps_)
    params = [p for p in algo.outer_parameters()]
    grads = [p.grad.clone() for p in params]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, dirs))
        h = 1e-5
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(h * d)
            plus = objective(model, eps_, "classification", cfg.l2)
            for p, d in zip(params, dirs):
                p.sub_(2 * h * d)
            minus = objective(model, eps_, "classification", cfg.l2)
            for p, d in zip(params, dirs):
                p.add_(h * d)
        fd = (plus - minus) / (2 * h)
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (fd, analytic)


def peak_mb(inner_steps: int, tiny) -> float:
    model = build_model("conv4", (1, 16, 16), 5, 16)
    algo = MRML(model, "classification", AlgoConfig(inner_steps=inner_steps, cg_steps=10, inner_solver="gd", implicit="cg"))
    eps_ = [tiny.episode("train", 4, 2, 3, episode_rng(0, "train", i)) for i in range(2)]
    algo.meta_gradient(eps_)  # warm-up: gradient buffers exist before measuring
    with PeakMemoryMeter() as meter:
        algo.meta_gradient(eps_)
    return meter.report().peak_mb


def test_peak_memory_does_not_grow_with_inner_steps(tiny):
    k1, k50 = peak_mb(1, tiny), peak_mb(50, tiny)
    assert k1 > 0
    assert k50 <= 1.02 * k1, (k1, k50)


def test_meter_counts_what_maml_style_unrolling_keeps():
    """Sanity of the meter: keeping a graph over K steps costs memory that grows with K."""
    def unrolled(k: int) -> float:
        w = torch.randn(256, 256, requires_grad=True)
        with PeakMemoryMeter() as m:
            x = torch.randn(64, 256)
            for _ in range(k):
                x = torch.tanh(x @ w)
            x.sum().backward()
        return m.report().peak_mb

    per_step = 64 * 256 * 4 / 2**20  # each step keeps one 64x256 float activation for backward
    grown = unrolled(20) - unrolled(2)
    assert abs(grown - 18 * per_step) <= 0.2 * 18 * per_step, grown


def test_episodes_reproducible_from_seed(tiny):
    a = tiny.episode("test", 3, 2, 4, episode_rng(7, "test", 5))
    b = tiny.episode("test", 3, 2, 4, episode_rng(7, "test", 5))
    c = tiny.episode("test", 3, 2, 4, episode_rng(8, "test", 5))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (6, 1, 16, 16) and a.query_x.shape == (12, 1, 16, 16)
    assert a.support_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_splits_are_class_disjoint(tiny):
    names = [set(tiny.splits[s].names) for s in ("train", "validation", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_cg_statistics_reported(tiny):
    model = build_model("conv4", (1, 16, 16), 3, 4)
    algo = MRML(model, "classification", AlgoConfig(inner_steps=5, cg_steps=7, inner_solver="gd", implicit="cg"))
    stats = algo.meta_gradient([tiny.episode("train", 3, 1, 2, np.random.default_rng(0))])
    assert 1 <= stats.extra["cg_iterations"] <= 7
    assert stats.extra["nonpositive_curvature"] == 0
    assert 0 <= stats.accuracy <= 1
