"""The independent exact hypergradient (`mrml.reference`) and the estimators measured against it (float64).

- the reference against closed forms (ridge) and central finite differences of Phi(x) = mean f(x, y*(x));
- the default mrml estimator (l2 = 0.01, K = 20) against the reference;
- ITD-BiO converges to the reference as K grows (reference and harness agree).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mrml.algorithms import MRML, AlgoConfig, ITDBiO
from mrml.data.base import Episode, episode_rng
from mrml.models import build_model
from mrml.reference import exact_hypergradient, objective
from ridge import ridge_model, ridge_tasks, true_hypergradient

DT = torch.float64


def tiny_conv(seed: int, width: int = 4, ways: int = 3) -> nn.Module:
    """Conv-4 (conv, batch norm, ReLU, max-pool) on 1x16x16, float64, zero head."""
    torch.manual_seed(seed)
    return build_model("conv4", (1, 16, 16), ways, width).to(DT)


def tiny_episodes(tiny, seed: int, n: int = 2, ways: int = 3, shots: int = 2, query: int = 3) -> list[Episode]:
    return [tiny.episode("train", ways, shots, query, episode_rng(seed, "train", i)).to("cpu", DT) for i in range(n)]


def backbone_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n.startswith("backbone.")])


def compare(est: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative error, cosine) of an estimate against the exact hypergradient."""
    return float((est - exact).norm() / exact.norm()), float(est @ exact / (est.norm() * exact.norm()))


def test_reference_matches_ridge_closed_form():
    tasks, model = ridge_tasks(4), ridge_model()
    ref = exact_hypergradient(model, tasks, "regression", lam=0.5)
    closed = true_hypergradient(model[0].weight.detach().T, tasks, 0.5).T
    assert list(ref.grads) == ["0.weight"]
    assert float((ref.grads["0.weight"] - closed).norm() / closed.norm()) < 1e-12
    assert max(ref.inner_grad_norm) < 1e-12 and max(ref.solve_residual) < 1e-12
    assert model[0].weight.grad is None  # the user's model is not touched


@pytest.mark.parametrize("lam", [0.01, 0.1])
def test_reference_matches_finite_differences(tiny, lam):
    """Central differences of Phi(x) = mean f(x, y*(x)) (y* by the reference's Newton) along random
    directions of every backbone parameter, on Conv-4 blocks with batch norm."""
    model, eps = tiny_conv(0), tiny_episodes(tiny, 0)
    ref = exact_hypergradient(model, eps, "classification", lam)
    grad = ref.flat()
    assert max(ref.inner_grad_norm) < 1e-12 and max(ref.solve_residual) < 1e-10
    assert abs(ref.phi - objective(model, eps, "classification", lam)) < 1e-14
    params = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    assert list(ref.grads) == [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    g, h = torch.Generator().manual_seed(1), 1e-5
    for _ in range(2):
        d = torch.randn(grad.numel(), generator=g, dtype=DT)
        d /= d.norm()

        def shifted(s: float) -> float:
            with torch.no_grad():
                i = 0
                for p in params:
                    p.add_(s * d[i: i + p.numel()].view_as(p))
                    i += p.numel()
            return objective(model, eps, "classification", lam)

        plus, minus = shifted(h), shifted(-2 * h)
        shifted(h)
        fd = (plus - minus) / (2 * h)
        assert abs(fd - float(grad @ d)) < 1e-7 * float(grad.norm()), (fd, float(grad @ d))


def test_reference_regression_head_with_bias_matches_finite_differences():
    """MSE on an MLP trunk with a biased linear head (the sinusoid setting)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    g = torch.Generator().manual_seed(3)
    eps = []
    for _ in range(2):
        xs = torch.rand(15, 1, generator=g, dtype=DT) * 10 - 5
        eps.append(Episode(xs[:5], torch.sin(xs[:5, 0]), xs[5:], torch.sin(xs[5:, 0])))
    ref = exact_hypergradient(model, eps, "regression", 0.1)
    assert set(ref.y_star[0]) == {"4.weight", "4.bias"} and "4.weight" not in ref.grads
    grad, params = ref.flat(), [p for n, p in model.named_parameters() if not n.startswith("4.")]
    d = torch.randn(grad.numel(), generator=g, dtype=DT)
    d /= d.norm()
    vals = []
    for s in (1e-5, -1e-5):
        shifted = []
        i = 0
        for p in params:
            shifted.append(p.detach() + s * d[i: i + p.numel()].view_as(p))
            i += p.numel()
        m = nn.Sequential(*[nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)]).to(DT)
        with torch.no_grad():
            for q, v in zip([q for n, q in m.named_parameters() if not n.startswith("4.")], shifted):
                q.copy_(v)
        vals.append(objective(m, eps, "regression", 0.1))
    fd = (vals[0] - vals[1]) / 2e-5
    assert abs(fd - float(grad @ d)) < 1e-7 * float(grad.norm()), (fd, float(grad @ d))


@pytest.mark.parametrize("seed", [0, 1])
def test_default_mrml_estimator_matches_reference(tiny, seed):
    """`MRML(model, "classification", AlgoConfig(l2=0.01))` with every other setting at its default (K=20)
    estimates the exact hypergradient: cosine >= 0.99 and a small relative error over the backbone."""
    model, eps = tiny_conv(seed), tiny_episodes(tiny, seed)
    exact = exact_hypergradient(model, eps, "classification", 0.01).flat()
    MRML(model, "classification", AlgoConfig(l2=0.01)).meta_gradient(eps)
    rel, cos = compare(backbone_grad(model), exact)
    assert cos >= 0.99 and rel < 1e-3, (rel, cos)


def test_itd_bio_converges_to_reference_as_k_grows(tiny):
    """ITD-BiO differentiates K head steps; on a strongly convex inner problem (lam = 1) it tends to the
    exact hypergradient: the reference and the estimator harness agree."""
    model, eps = tiny_conv(2), tiny_episodes(tiny, 2)
    exact = exact_hypergradient(model, eps, "classification", 1.0).flat()
    errors = []
    for k in (5, 50, 500):
        ITDBiO(model, "classification", AlgoConfig(l2=1.0, inner_steps=k, inner_lr=0.1)).meta_gradient(eps)
        errors.append(compare(backbone_grad(model), exact)[0])
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-8, errors


def test_estimator_benchmark_sweep_writes_table_and_plot(tiny, tmp_path, monkeypatch):
    """benchmarks/estimator.py on a tiny net, one K and one lam: every estimator measured (the inner-solver
    fields exist), mrml exact within 1e-5 of the reference, the table and the plot written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "estimator.py"
    spec = importlib.util.spec_from_file_location("mrml_benchmarks_estimator", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "KS", [10])
    monkeypatch.setattr(bench, "LAMS", [0.1])
    rows = bench.sweep("tiny", tiny_conv(4), tiny_episodes(tiny, 4), log=lambda *_: None)
    assert [r["estimator"] for r in rows] == list(bench.ESTIMATORS)
    by = {r["estimator"]: r for r in rows}
    assert all(r["cosine"] is not None and -1 <= r["cosine"] <= 1 + 1e-12 for r in rows)
    assert by["mrml exact"]["rel_error"] < 1e-5 and by["mrml gd"]["rel_error"] > 1e-3
    assert by["anil"]["rel_error"] == pytest.approx(by["itd-bio"]["rel_error"], rel=1e-9)
    md = bench.markdown(rows, {"tiny": "tiny conv"})
    assert "| 0.1 | mrml exact |" in md and "K=10" in md
    bench.plot(rows, {"tiny": "tiny conv"}, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes().startswith(b"\x89PNG")
