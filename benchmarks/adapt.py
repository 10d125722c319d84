"""Test-time adaptation settings compared on paired seeded episodes (`mrml eval --adapt`, issue 22).

Every configuration sees the same episodes (episode i from `episode_rng(seed, split, i)`), so the
difference to `head` is paired: its interval is 1.96 std(differences) / sqrt(T). Choose settings on the
validation split; report the test split once, with the chosen settings.

    python benchmarks/adapt.py --run RUN_DIR [--run LABEL=DIR ...] [--split-file F] --split validation \
        --shots 1,5 --episodes 100 --configs "head;last-block:100:1e-3:0;last-block:20:1e-2:0;all:20:1e-3:0;auto" \
        --out benchmarks/results/adapt/NAME

A configuration is `head`, or `MODE[:STEPS[:LR[:PROX]]]` (missing values: the defaults of
`mrml.algorithms.finetune`). Writes OUT/results.json, results.csv and results.png (accuracy per
configuration and shot count, with intervals), and prints one line per result.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_config(text: str) -> dict[str, Any]:
    parts = text.strip().split(":")
    mode, rest = parts[0], parts[1:]
    if mode == "head":
        if rest:
            raise SystemExit(f"configuration {text!r}: head takes no settings")
        return {"adapt": "head"}
    keys, out = ("adapt_steps", "adapt_lr", "adapt_prox"), {"adapt": mode}
    for key, value in zip(keys, rest):
        out[key] = int(value) if key == "adapt_steps" else float(value)
    return out


def label_of(cfg: dict[str, Any]) -> str:
    extra = [str(cfg[k]) for k in ("adapt_steps", "adapt_lr", "adapt_prox") if cfg.get(k) is not None]
    return ":".join([cfg["adapt"], *extra])


def evaluate(run: Any, source: Any, split: str, shots: int, episodes: int, seed: int, cfg: dict[str, Any],
             ways: int | None, query: int | None) -> dict[str, Any]:
    from mrml.algorithms.finetune import adapt_settings
    from mrml.data.arrays import conform
    from mrml.evaluate import episode_scores

    settings = adapt_settings(cfg["adapt"], cfg.get("adapt_steps"), cfg.get("adapt_lr"), cfg.get("adapt_prox"))
    ways = run.config.ways if ways is None else ways
    query = run.config.query if query is None else query
    src = conform(source, run.input_shape)
    learner = run.learner_for(ways)
    chosen: list[bool] = []
    t0 = time.perf_counter()
    losses, accs = episode_scores(learner, src, split, ways, shots, query, seed, range(episodes), run.device,
                                  run.dtype, False, adapt=settings, chosen=chosen)
    seconds = (time.perf_counter() - t0) / episodes
    out = {**settings.record(), "accuracies": accs, "loss": float(np.mean(losses)), "seconds_per_episode": seconds}
    if settings.mode == "auto":
        out["auto_last_block_share"] = float(np.mean(chosen)) if chosen else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="a run folder, or LABEL=FOLDER (repeatable)")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split-file", default=None, help="class split to draw the episodes from (default: the canonical)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--shots", default="1,5")
    p.add_argument("--ways", type=int, default=None)
    p.add_argument("--query", type=int, default=None)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="head;last-block;auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)

    import torch

    from mrml.data.registry import build_dataset
    from mrml.evaluate import confidence95
    from mrml.runs import load_run

    torch.set_num_threads(ns.threads)
    configs = [parse_config(c) for c in ns.configs.split(";") if c.strip()]
    if configs[0]["adapt"] != "head":
        configs.insert(0, {"adapt": "head"})  # the paired reference
    opts: dict[str, Any] = {} if ns.split_file is None else {"split_file": ns.split_file}
    source = build_dataset(ns.dataset, ns.data_root, **opts)
    ns.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in ns.run:
        label, _, folder = spec.rpartition("=")
        run = load_run(folder)
        label = label or Path(folder).name
        for shots in [int(s) for s in ns.shots.split(",")]:
            head_accs = None
            for cfg in configs:
                r = evaluate(run, source, ns.split, shots, ns.episodes, ns.seed, cfg, ns.ways, ns.query)
                accs = r.pop("accuracies")
                if head_accs is None:
                    head_accs = accs
                diff = [a - b for a, b in zip(accs, head_accs)]
                row = {"run": label, "run_dir": folder, "split": ns.split, "split_file": ns.split_file, "shots": shots,
                       "config": label_of(cfg), **r, "accuracy": float(np.mean(accs)), "ci95": confidence95(accs),
                       "vs_head": float(np.mean(diff)), "vs_head_ci95": confidence95(diff), "episodes": ns.episodes}
                results.append(row)
                share = f", last-block chosen {100 * row['auto_last_block_share']:.0f}%" if "auto_last_block_share" in row else ""
                print(f"{label} {ns.split} {shots}-shot {row['config']:>28}: {100 * row['accuracy']:6.2f}% ± "
                      f"{100 * row['ci95']:.2f}  vs head {100 * row['vs_head']:+6.2f} ± {100 * row['vs_head_ci95']:.2f}"
                      f"  ({row['seconds_per_episode']:.2f} s/episode{share})", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()}
    (ns.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    keys = ["run", "split", "shots", "config", "accuracy", "ci95", "vs_head", "vs_head_ci95", "loss",
            "seconds_per_episode", "episodes"]
    with open(ns.out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for r in results:
            w.writerow([r[k] for k in keys])
    plot(results, ns.out / "results.png")
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["run"], r["shots"]) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (run, shots) in zip(axes[0], groups):
        rows = [r for r in results if r["run"] == run and r["shots"] == shots]
        ax.errorbar(range(len(rows)), [100 * r["accuracy"] for r in rows], yerr=[100 * r["ci95"] for r in rows],
                    fmt="o", capsize=3)
        ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{run}, {shots}-shot ({rows[0]['split']})", fontsize=8)
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
