"""benchmarks/theory.py on tiny sizes: finite figures, the deterministic verdict, and the files it writes."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mrml.toy import inner_solution, outer_variable, ridge_model, ridge_tasks, true_hypergradient

THEORY = Path(__file__).resolve().parents[1] / "benchmarks" / "theory.py"


@pytest.fixture(scope="module")
def theory():
    spec = importlib.util.spec_from_file_location("mrml_benchmarks_theory", THEORY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def test_toy_closed_form_is_stationary_and_matches_finite_differences():
    tasks = ridge_tasks(3, d=5, n=12, m=7, seed=2)
    x = outer_variable(ridge_model(5, 3, seed=2))
    lam = 0.7
    y = inner_solution(x, tasks, lam)
    z = tasks.support_x @ x  # inner gradient at y* vanishes
    grad_y = 2 * (z.transpose(-1, -2) @ ((z @ y.unsqueeze(-1)).squeeze(-1) - tasks.support_y).unsqueeze(-1)).squeeze(-1) / 12 + lam * y
    assert float(grad_y.abs().max()) < 1e-12
    from mrml.toy import outer_objective
    g = true_hypergradient(x, tasks, lam, mu=0.1)
    e = torch.zeros_like(x)
    e[1, 2] = 1e-6
    fd = (outer_objective(x + e, tasks, lam, 0.1) - outer_objective(x - e, tasks, lam, 0.1)) / 2e-6
    assert abs(float(fd) - float(g[1, 2])) < 1e-7


def test_deterministic_ridge_passes(theory):
    r = theory.deterministic_ridge(quick=True, iterations=120, stop=1e-7, cold_iterations=5)
    assert r["passed"] and "PASS" in r["verdict"] and r["final"] < 1e-6
    assert finite(r["norms"]) and finite(r["cold_norms"]) and r["norms"][0] > 0.5


def test_small_runs_give_finite_figures(theory, tmp_path):
    conv = theory.deterministic_conv(quick=True, tasks=1, iterations=6, every=3)
    assert finite(conv["norms"]) and len(conv["norms"]) == 3 and max(conv["certificates"]) < 1e-6
    sto = theory.stochastic(quick=True, batches=[1, 4], pool=32, iterations=6, burn_in=2)
    assert finite(sto["plateaus"]) and math.isfinite(sto["fit"]["slope"]) and sto["bias2_at_xstar"] >= 0
    est = theory.estimation(quick=True, d=6, p=4, n=16, m=8, k_max=30, k_every=5, n_max=6)
    assert finite(est["K_error"]) and finite(est["N_error"])
    assert est["K_fit"]["slope"] < 0 and est["N_fit"]["slope"] < 0
    det = theory.deterministic_ridge(quick=True, tasks=2, iterations=30, stop=0.0, cold_iterations=3)
    rt = theory.rate(det, conv, t_min=1)
    assert math.isfinite(rt["conv"]["fit"]["slope"]) and "rate in T" in rt["verdict"]

    res = {"deterministic_ridge": det, "deterministic_conv": conv, "stochastic": sto, "rate": rt, "estimation": est}
    paths = theory.save_figures(res, tmp_path, "t")
    assert [p.name for p in paths] == ["t.png", "t_deterministic.png", "t_stochastic.png", "t_rate.png", "t_estimation.png"]
    for p in paths:
        assert p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000
    md = theory.markdown(res, "t", 1.0)
    assert "## Does the theory hold?" in md and "t_stochastic.png" in md
    json.dumps(theory._jsonable(res))


@pytest.mark.slow
def test_quick_run_writes_results(theory, tmp_path, capsys):
    """The quick run is seeded and every one of its five verdicts must hold: the exit code, the JSON and
    the printed verdicts all say PASS (a run whose verdicts FAIL is a failure of this test)."""
    code = theory.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "theory_quick.json").read_text())
    names = ("deterministic_ridge", "deterministic_conv", "stochastic", "rate", "estimation")
    failed = [data[k]["verdict"] for k in names if not data[k]["passed"]]
    assert not failed, failed
    assert data["quick"] and data["passed"] and code == 0
    assert all(data[k]["verdict"].endswith("PASS") for k in names)
    assert out.count("PASS") >= 5 and "FAIL" not in out and "all PASS" in out
    # the conv net's true hypergradient is the independent reference's, certified to rounding
    assert max(data["deterministic_conv"]["certificates"]) < 1e-10
    assert "mrml.reference" in data["deterministic_conv"]["reference"]
    assert (tmp_path / "theory_quick.png").is_file() and (tmp_path / "theory_quick.md").is_file()
