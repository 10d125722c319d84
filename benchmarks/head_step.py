"""What the default form adds per task on top of the network: `exact_head.head_step` timed alone, per tree.

The features, labels and starting heads of real tasks are captured once (glyphs, Conv-4-64, the bench
configuration of `mrml bench memory` meta-trained for `--warm` meta-iterations, this tree), saved, and
then every tree (`PYTHONPATH` picks it; fresh processes, the trees alternating over `--rounds`) runs
on the same tasks at T = 1, one thread:
- `head_step`: Newton on the head, the implicit solve, the surrogate's backward into the features (leaf
  tensors here: the trunk's own backward is the floor's and is not timed) and the statistics' host read;
- `newton`: the masked Newton solve alone (`newton_heads`, its problem built).
Per process the best of `--repeats` passes over all tasks (ms per task); per tree the median over rounds.

    python benchmarks/head_step.py --tree prev=../prev/src --tree new=src --ways 5 --shots 1 \\
        --out benchmarks/results/head_step/5w1s

Writes OUT/results.json (every pass), results.csv (per tree) and results.png, and prints one line per tree
(the child processes and the result files as `benchmarks/paired_floor.py` runs and writes them).
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

from paired_floor import run_trees, write_results  # the trees alternating in child processes; the result files


def settings(ns: argparse.Namespace):
    from mrml.bench import BenchSettings

    return BenchSettings(dataset="glyphs", ways=ns.ways, shots=ns.shots, query=ns.query, meta_batch=4, threads=1,
                         backbone="conv4", width=64, repeats=1, seed=ns.seed)


def capture(ns: argparse.Namespace, path: Path) -> None:
    """Meta-train the bench configuration for `--warm` iterations, keeping the last `--tasks` tasks' inputs."""
    import torch

    from mrml.algorithms import exact_head, mrml as mrml_module
    from mrml.bench import build_config, make_source, step_function

    torch.set_num_threads(1)
    s = settings(ns)
    run = build_config(s, make_source(s), "mrml", "default", ns.inner_steps)
    step, caught, real = step_function(run), [], exact_head.head_step

    def spy(algo, fs, fq, sy, qy, w0, scale, v0=None):
        caught.append({"fs": fs.detach().clone(), "fq": fq.detach().clone(), "sy": sy.clone(), "qy": qy.clone(),
                       "w0": w0.detach().clone()})
        return real(algo, fs, fq, sy, qy, w0, scale, v0)

    mrml_module.head_step = spy
    for t in range(ns.warm):
        step(run.episodes(t))
    torch.save(caught[-ns.tasks:], path)


def child(ns: argparse.Namespace) -> dict:
    import torch

    from mrml.algorithms import exact_head
    from mrml.bench import build_config, make_source
    from mrml.solvers.head import newton_heads

    torch.set_num_threads(1)
    tasks = torch.load(ns.tasks_file)
    algo = build_config(settings(ns), make_source(settings(ns)), "mrml", "default", ns.inner_steps).algo
    records = exact_head.step_records
    takes_qy = len(inspect.signature(records).parameters) == 3  # trees before the statistics moved into head_step

    def full(t: dict) -> None:
        fs, fq = t["fs"].clone().requires_grad_(True), t["fq"].clone().requires_grad_(True)
        step = exact_head.head_step(algo, fs, fq, t["sy"], t["qy"], t["w0"], 0.25)
        records(algo, step, t["qy"]) if takes_qy else records(algo, step)

    def newton(t: dict) -> None:
        inner = exact_head.head_problem(algo, t["fs"], t["sy"], algo.l2_value(),
                                        exact_head.stacked_centre(algo, False, 1))
        newton_heads(inner, t["w0"], ns.inner_steps, algo.config.inner_tol, hint=algo.newton_hint)

    out = {}
    for name, fn in (("head_step", full), ("newton", newton)):
        for t in tasks[:10]:
            fn(t)
        passes = []
        for _ in range(ns.repeats):
            t0 = time.perf_counter()
            for t in tasks:
                fn(t)
            passes.append((time.perf_counter() - t0) / len(tasks) * 1e3)
        out[name] = passes
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="LABEL=SRC_FOLDER (repeatable; default: new=src)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=60, help="meta-iterations before the tasks are kept")
    p.add_argument("--tasks", type=int, default=200, help="tasks kept (the last ones)")
    p.add_argument("--repeats", type=int, default=7, help="timed passes over the tasks per process")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per tree, the trees alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tasks-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        print(json.dumps(child(ns)))
        return 0
    if ns.out is None:
        p.error("--out is needed")
    ns.out.mkdir(parents=True, exist_ok=True)
    tasks_file = ns.out / "tasks.pt"
    capture(ns, tasks_file)
    runs: dict[str, list[dict]] = {}

    def collect(r: int, label: str, got: dict) -> None:
        runs.setdefault(label, []).append(got)
        best = {k: min(v) for k, v in got.items()}
        print(f"round {r + 1}/{ns.rounds} {label}: head_step {best['head_step']:.3f} ms, "
              f"newton {best['newton']:.3f} ms per task (best pass)", flush=True)

    try:
        run_trees(__file__, ns.tree, argv, ns.rounds, collect, extra=["--tasks-file", str(tasks_file)],
                  env={"OMP_NUM_THREADS": "1"})
    finally:
        tasks_file.unlink(missing_ok=True)
    rows = [{"tree": label, "rounds": len(rs),
             **{f"{k}_ms": round(statistics.median(min(r[k]) for r in rs), 4) for k in ("head_step", "newton")}}
            for label, rs in runs.items()]
    for row in rows:
        print(f"{row['tree']}: head_step {row['head_step_ms']:.3f} ms, newton {row['newton_ms']:.3f} ms per task "
              f"(median over {row['rounds']} processes of the best pass)")
    write_results(ns, rows, "passes", runs, hidden=("child", "tasks_file"))
    plot(runs, ns.out / "results.png", f"{ns.ways}-way {ns.shots}-shot, T = 1, one thread")
    return 0


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for j, key in enumerate(("head_step", "newton")):
        for i, (label, rs) in enumerate(runs.items()):
            x = i + 0.35 * (j - 0.5)
            best = [min(r[key]) for r in rs]
            ax.plot([x] * len(best), best, "o", color=f"C{j}", alpha=0.7, label=key if i == 0 else None)
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set_ylabel("ms per task (best pass per process)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
