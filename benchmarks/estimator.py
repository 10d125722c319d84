"""How close is each hypergradient estimator to the exact hypergradient?

For a head-only inner problem g = CE_support + lam/2 ||y||^2 (ridge centre 0), the exact hypergradient of
Phi(x) = mean f(x, y*(x)) over the backbone comes from `mrml.reference` (independent of mrml's estimator
code: Newton with the dense Hessian, a direct solve; float64). Each estimator is run through its public
class (`MRML`, `ITDBiO`, `ANIL`, `meta_gradient` then the backbone's `.grad`, float64) on the same
episodes, and compared over the backbone: relative error ||g_est - g_exact|| / ||g_exact||, cosine, and the
length ratio ||g_est|| / ||g_exact||.

Estimators (AlgoConfig(l2=lam, inner_steps=K, inner_lr=0.1, cg_steps=20) plus):
  mrml gd        inner_solver="gd", implicit="cg"       (Algorithm 1 as written)
  mrml exact     inner_solver="newton"                  (exact inner solve)
  mrml damped    inner_solver="gd", implicit="damped"   (CG on H + delta I: the K-step problem)
  mrml neumann   inner_solver="gd", implicit="neumann"  (K-term Neumann series)
  itd-bio        K unrolled head steps from the fixed head init
  anil           K unrolled head steps from the (learned) head init, l2 = lam
                 (on the backbone this is itd-bio's gradient exactly: same inner loss, same init; the two
                 differ only in the head init's own gradient, which is not compared)
An estimator that needs AlgoConfig fields this version of mrml lacks is reported as n/a (the plain
AlgoConfig of such a version is "mrml gd").

Models: (i) `conv` -- Conv-4 of width 16 on glyphs 28x28, seeded random init, zero head; (ii) `trained` --
the glyphs checkpoint of a run (`--run DIR`; default: `mrml train --iterations 30` into
benchmarks/runs/estimator-glyphs, trained once then reused). Both in float64; 5-way 1-shot, 15 queries,
`--episodes` test episodes (default 8), the meta-gradient being their mean.

    python benchmarks/estimator.py [--run DIR] [--episodes 8] [--models conv,trained] [--out benchmarks/results]

Writes estimator.json, estimator.csv, estimator.md (tables for the README) and estimator.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrml.algorithms import ANIL, MRML, AlgoConfig, ITDBiO, MetaAlgorithm
from mrml.checkpoint import load_checkpoint
from mrml.config import RunConfig
from mrml.data import build_dataset
from mrml.data.base import Episode, episode_rng
from mrml.models import build_model
from mrml.reference import exact_hypergradient

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_RUN = HERE / "runs" / "estimator-glyphs"
DT = torch.float64

KS = [5, 20, 100]
LAMS = [0.01, 0.1, 1.0]
INNER_LR, CG_STEPS = 0.1, 20
WAYS, SHOTS, QUERY = 5, 1, 15
#: estimator name -> (class, AlgoConfig fields beyond l2, K, alpha and N)
ESTIMATORS: dict[str, tuple[type[MetaAlgorithm], dict[str, Any]]] = {
    "mrml gd": (MRML, {"inner_solver": "gd", "implicit": "cg"}),
    "mrml exact": (MRML, {"inner_solver": "newton"}),
    "mrml damped": (MRML, {"inner_solver": "gd", "implicit": "damped"}),
    "mrml neumann": (MRML, {"inner_solver": "gd", "implicit": "neumann"}),
    "itd-bio": (ITDBiO, {}),
    "anil": (ANIL, {}),
}
#: line style per estimator in the plot (anil dashed: on the backbone it coincides with itd-bio, see above)
STYLE = {"mrml gd": "o-", "mrml exact": "s-", "mrml damped": "^-", "mrml neumann": "v-", "itd-bio": "D-", "anil": "x--"}
TRAIN_ARGS = ["--dataset", "glyphs", "--algo", "mrml", "--ways", "5", "--shots", "1", "--iterations", "30",
              "--val-every", "1000", "--test-episodes", "50", "--threads", "1", "--seed", "0", "--no-progress"]


def config_for(extra: dict[str, Any], **base: Any) -> AlgoConfig | None:
    """AlgoConfig(**base, **extra); None if this version of mrml lacks a field `extra` needs. Without the
    inner-solver fields, the plain config is Algorithm 1 as written (gd, cg)."""
    have = {f.name for f in fields(AlgoConfig)}
    if not set(extra) <= have:
        if extra == {"inner_solver": "gd", "implicit": "cg"} and not {"inner_solver", "implicit"} & have:
            return AlgoConfig(**base)
        return None
    return AlgoConfig(**base, **extra)


def backbone_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("backbone.")]


def estimate(cls: type[MetaAlgorithm], model: nn.Module, cfg: AlgoConfig, episodes: list[Episode]) -> torch.Tensor:
    """The estimator's mean meta-gradient over the backbone (flat); the model's parameters are unchanged."""
    cls(model, "classification", cfg).meta_gradient(episodes)
    ps = dict(model.named_parameters())
    grad = torch.cat([ps[n].grad.reshape(-1) if ps[n].grad is not None else torch.zeros(ps[n].numel(), dtype=DT)
                      for n in backbone_names(model)])
    for p in model.parameters():
        p.grad = None
    return grad


def compare(est: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    en, xn = float(est.norm()), float(exact.norm())
    return {"rel_error": float((est - exact).norm()) / xn, "cosine": float(est @ exact) / max(en * xn, 1e-300),
            "length_ratio": en / xn}


# -- models ----------------------------------------------------------------------------------------
def conv_model(data: Any, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("conv4", data.input_shape, data.num_outputs(WAYS), width).to(DT)


def trained_model(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run's checkpoint.pt, float64, with the run's settings."""
    state = load_checkpoint(run_dir)
    cfg = RunConfig.from_dict(state["config"])
    data = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options())
    model = build_model(cfg.backbone, data.input_shape, data.num_outputs(cfg.ways), cfg.width)
    model.load_state_dict(state["model"])
    info = {"run": str(run_dir), "iteration": state["iteration"], "algo": cfg.algo, "backbone": cfg.backbone,
            "width": cfg.width, "l2": cfg.l2, "dataset": cfg.dataset}
    return model.to(DT), info


def ensure_run(run_dir: Path) -> None:
    """Train the default glyphs run into `run_dir` unless it already holds a checkpoint."""
    if (run_dir / "checkpoint.pt").is_file():
        return
    cmd = [sys.executable, "-m", "mrml", "train", *TRAIN_ARGS, "--out", str(run_dir)]
    print("training the checkpoint:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


# -- the sweep ---------------------------------------------------------------------------------------
def sweep(name: str, model: nn.Module, episodes: list[Episode], log: Any = print) -> list[dict[str, Any]]:
    rows = []
    for lam in LAMS:
        t0 = time.perf_counter()
        ref = exact_hypergradient(model, episodes, "classification", lam)
        exact = ref.flat(backbone_names(model))
        log(f"[{name}] lam={lam:g}: exact ||grad|| {float(exact.norm()):.3e}, Newton steps {max(ref.newton_steps)}, "
            f"certificate {max(ref.inner_grad_norm):.0e} ({time.perf_counter() - t0:.1f}s)")
        for k in KS:
            for est, (cls, extra) in ESTIMATORS.items():
                cfg = config_for(extra, l2=lam, inner_steps=k, inner_lr=INNER_LR, cg_steps=CG_STEPS)
                row: dict[str, Any] = {"model": name, "lam": lam, "K": k, "estimator": est}
                if cfg is None:
                    row.update(rel_error=None, cosine=None, length_ratio=None, seconds=None)
                else:
                    t0 = time.perf_counter()
                    row.update(compare(estimate(cls, model, cfg, episodes), exact))
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
            line = "  ".join(f"{r['estimator']} {_cell(r)}" for r in rows[-len(ESTIMATORS):])
            log(f"[{name}] lam={lam:g} K={k}: {line}")
    return rows


def _cell(r: dict[str, Any]) -> str:
    if r["cosine"] is None:
        return "n/a"
    return f"{r['cosine']:.3f} / {r['rel_error']:.2g}"


# -- outputs -----------------------------------------------------------------------------------------
def markdown(rows: list[dict[str, Any]], models: dict[str, str]) -> str:
    """One table per model: rows (lam, estimator), columns K; cells 'cosine / relative error'."""
    out = []
    for name, desc in models.items():
        out.append(f"**{desc}**: cosine / relative error of the estimate against the exact hypergradient over the "
                   f"backbone (float64; alpha = {INNER_LR}, N = {CG_STEPS}; n/a: not in this version of mrml):\n")
        out.append("| lam | estimator | " + " | ".join(f"K={k}" for k in KS) + " |")
        out.append("|---|---|" + "---|" * len(KS))
        for lam in LAMS:
            for est in ESTIMATORS:
                cells = [_cell(next(r for r in rows if r["model"] == name and r["lam"] == lam and r["K"] == k
                                    and r["estimator"] == est)) for k in KS]
                out.append(f"| {lam:g} | {est} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("anil coincides with itd-bio on the backbone (same inner loss and head init; only the head init's own "
               "gradient differs). mrml exact: Newton stops at `inner_tol` (relative) or after K iterations, whichever "
               "comes first; the other mrml rows start from the head init and take K guarded gradient steps.\n")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], models: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(models), len(LAMS), figsize=(4.6 * len(LAMS), 3.4 * 2 * len(models)), squeeze=False)
    for i, (name, desc) in enumerate(models.items()):
        for j, lam in enumerate(LAMS):
            for est in ESTIMATORS:
                sel = [r for r in rows if r["model"] == name and r["lam"] == lam and r["estimator"] == est
                       and r["cosine"] is not None]
                if not sel:
                    continue
                ks = [r["K"] for r in sel]
                axes[2 * i, j].semilogx(ks, [r["cosine"] for r in sel], STYLE[est], ms=4, label=est)
                axes[2 * i + 1, j].loglog(ks, [max(r["rel_error"], 1e-16) for r in sel], STYLE[est], ms=4, label=est)
            axes[2 * i, j].set(title=f"{name}: lam={lam:g}", ylabel="cosine", xlabel="K (inner steps)")
            axes[2 * i + 1, j].set(ylabel="relative error", xlabel="K (inner steps)")
            axes[2 * i + 1, j].axhline(1.0, color="gray", lw=0.6, ls=":")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("; ".join(f"{k}: {v}" for k, v in models.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help=f"trained run folder (default: train one into {DEFAULT_RUN})")
    ap.add_argument("--episodes", type=int, default=8, help="test episodes per setting (5-way 1-shot)")
    ap.add_argument("--models", default="conv,trained", help="comma-separated: conv, trained")
    ap.add_argument("--out", default=str(RESULTS), help="output folder")
    ap.add_argument("--stem", default="estimator")
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    t_start = time.perf_counter()
    wanted = [m.strip() for m in ns.models.split(",") if m.strip()]
    data = build_dataset("glyphs")
    episodes = [data.episode("test", WAYS, SHOTS, QUERY, episode_rng(0, "test", i)).to("cpu", DT)
                for i in range(ns.episodes)]
    rows: list[dict[str, Any]] = []
    models: dict[str, str] = {}
    meta: dict[str, Any] = {}
    if "conv" in wanted:
        models["conv"] = "Conv-4-16, random init (glyphs 28x28)"
        meta["conv"] = {"backbone": "conv4", "width": 16, "seed": 0, "head": "zero"}
        rows += sweep("conv", conv_model(data), episodes)
    if "trained" in wanted:
        run_dir = Path(ns.run) if ns.run else DEFAULT_RUN
        if ns.run is None:
            ensure_run(run_dir)
        model, info = trained_model(run_dir)
        models["trained"] = f"{info['backbone']}-{info['width'] or 64} after {info['iteration']} {info['algo']} iterations (glyphs)"
        meta["trained"] = info
        rows += sweep("trained", model, episodes)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - t_start
    have = {f.name for f in fields(AlgoConfig)}
    result = {"settings": {"K": KS, "lam": LAMS, "inner_lr": INNER_LR, "cg_steps": CG_STEPS, "ways": WAYS,
                           "shots": SHOTS, "query": QUERY, "episodes": ns.episodes, "episode_split": "test",
                           "episode_seed": 0, "dtype": "float64",
                           "estimators": {k: v[1] for k, v in ESTIMATORS.items()},
                           "inner_solver_fields": sorted({"inner_solver", "implicit", "inner_tol"} & have)},
              "models": meta, "rows": rows, "seconds": round(seconds, 1), "torch": torch.__version__}
    (out / f"{ns.stem}.json").write_text(json.dumps(result, indent=1, default=lambda v: None) + "\n")
    with open(out / f"{ns.stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "lam", "K", "estimator", "cosine", "rel_error", "length_ratio", "seconds"])
        w.writeheader()
        w.writerows(rows)
    md = markdown(rows, models)
    (out / f"{ns.stem}.md").write_text(md)
    plot(rows, models, out / f"{ns.stem}.png")
    print(md)
    print(f"{seconds:.0f}s; wrote {out / ns.stem}.json, .csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
