"""mrml's meta-iteration against the floor, timed in pairs within one process (a finer instrument than
`mrml bench memory` for a few-percent effect on a noisy machine).

`mrml bench memory` times the floor and mrml in separate processes, one after the other; on a shared
or virtual machine a whole process can run 10-50% slower than the next, so one round's ratio moves by
that much. Here one process builds both (the floor: a plain forward and backward of the same network
on the same images, as `mrml bench memory` defines it; mrml at K inner steps), warms both up, then times
them alternately, step by step, on the same episodes: a slow spell hits both members of a pair, and
the median of the per-pair ratios is what the code costs. Each tree (`PYTHONPATH` picks it) runs in its
own fresh process, the trees alternating over `--rounds`.

    python benchmarks/paired_floor.py --tree old=../old/src --tree new=src --ways 5 --shots 1 \\
        --meta-batch 4 --repeats 40 --rounds 3 --out benchmarks/results/paired_floor/5w1s_b4

Writes OUT/results.json (every pair's seconds), results.csv (per tree: median ratio, its quartiles,
median seconds) and results.png (the ratios of every pair, per tree), and prints one line per tree.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence


def child(args: argparse.Namespace) -> dict:
    import torch

    from mrml import harness
    from mrml.bench import BenchSettings, build_config, make_source, step_function

    torch.set_num_threads(args.threads)
    s = BenchSettings(dataset=args.dataset, ways=args.ways, shots=args.shots, query=args.query,
                      meta_batch=args.meta_batch, threads=args.threads, backbone=args.backbone, width=args.width,
                      repeats=args.repeats, seed=args.seed)
    source = make_source(s)
    runs = {}
    for name, algo, k in (("floor", "floor", None), ("mrml", "mrml", args.inner_steps)):
        run = build_config(s, source, algo, "default", k)
        batches = [run.episodes(t) for t in range(1 + args.repeats)]
        step = step_function(run)
        harness.warm_up(step, batches[0], run.device)
        runs[name] = (step, batches, run.device)
    pairs = []
    for t in range(args.repeats):
        pair = {}
        for name, (step, batches, dev) in runs.items():
            pair[name] = harness.timed(step, batches[1 + t], dev)[0]
        pairs.append(pair)
    return {"pairs": pairs, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="LABEL=SRC_FOLDER (repeatable; default: new=src)")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=40, help="timed pairs per process")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per tree, the trees alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        print(json.dumps(child(ns)))
        return 0
    if ns.out is None:
        p.error("--out is needed")
    pairs: dict[str, list[dict]] = {}

    def collect(r: int, label: str, got: dict) -> None:
        pairs.setdefault(label, []).extend({**x, "round": r} for x in got["pairs"])
        print(f"round {r + 1}/{ns.rounds} {label}: median ratio so far "
              f"{statistics.median(x['mrml'] / x['floor'] for x in pairs[label]):.3f}", flush=True)

    run_trees(__file__, ns.tree, argv, ns.rounds, collect)
    rows = []
    for label, xs in pairs.items():
        ratios = sorted(x["mrml"] / x["floor"] for x in xs)
        q = statistics.quantiles(ratios, n=4)
        rows.append({"tree": label, "pairs": len(xs), "median_ratio": round(statistics.median(ratios), 4),
                     "q1": round(q[0], 4), "q3": round(q[2], 4),
                     "floor_s": round(statistics.median(x["floor"] for x in xs), 5),
                     "mrml_s": round(statistics.median(x["mrml"] for x in xs), 5)})
        print(f"{label}: mrml / floor median {rows[-1]['median_ratio']:.3f} (quartiles {rows[-1]['q1']:.3f}-"
              f"{rows[-1]['q3']:.3f}, {len(xs)} pairs); floor {rows[-1]['floor_s']:.4f} s, mrml {rows[-1]['mrml_s']:.4f} s")
    write_results(ns, rows, "pairs", pairs)
    plot(pairs, ns.out / "results.png", f"{ns.ways}-way {ns.shots}-shot, meta-batch {ns.meta_batch}, K = {ns.inner_steps}")
    return 0


def run_trees(script: str, trees: list[str], argv: list[str] | None, rounds: int,
              collect: Callable[[int, str, dict], None], extra: Sequence[str] = (), env: dict[str, str] | None = None,
              ) -> None:
    """Run `script --child *extra` with the command line's options but the trees, once per tree (LABEL=SRC_FOLDER,
    default new=src; `PYTHONPATH` = that folder) per round, the trees alternating; each child prints its result as
    JSON on its last line, handed to `collect(round, label, result)`. Shared with benchmarks/head_step.py."""
    given = argv if argv is not None else sys.argv[1:]
    forwarded = [a for i, a in enumerate(given) if not (a.startswith("--tree") or (i > 0 and given[i - 1] == "--tree"))]
    for r in range(rounds):
        for label, src in (t.split("=", 1) for t in (trees or ["new=src"])):
            child_env = {**os.environ, **(env or {}), "PYTHONPATH": str(Path(src).resolve())}
            out = subprocess.run([sys.executable, script, "--child", *extra, *forwarded], env=child_env, check=True,
                                 capture_output=True, text=True).stdout
            collect(r, label, json.loads(out.strip().splitlines()[-1]))


def write_results(ns: argparse.Namespace, rows: list[dict], raw_key: str, raw: dict, hidden: Sequence[str] = ("child",)
                  ) -> None:
    """OUT/results.json (the settings but `hidden` options, the summary `rows`, `raw` under `raw_key`) and
    OUT/results.csv (the rows)."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items() if k not in hidden}
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "results.json").write_text(json.dumps({"settings": settings, "summary": rows, raw_key: raw}, indent=1))
    with open(ns.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(pairs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (label, xs) in enumerate(pairs.items()):
        ratios = [x["mrml"] / x["floor"] for x in xs]
        ax.plot([i + 0.3 * (j / max(len(ratios) - 1, 1) - 0.5) for j in range(len(ratios))], ratios, ".", alpha=0.6)
        ax.hlines(statistics.median(ratios), i - 0.2, i + 0.2, color="black")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xticks(range(len(pairs)), list(pairs))
    ax.set_ylabel("mrml step / floor step (per pair)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
