"""Speed of two source trees of mrml compared fairly: `mrml bench memory` rounds, interleaved.

On a shared or small machine the seconds of one `mrml bench memory` run drift by 10-20% from run to
run, so comparing one run of each tree says little. Here the two trees (e.g. `git worktree add OLD
<rev>`) run alternately, `--rounds` times each, in fresh processes (PYTHONPATH picks the tree); the
target ratios (mrml seconds / floor, / ANIL; peak ratios) are compared by their medians over rounds.

    python benchmarks/speed_ab.py --old ../old/src --new src --rounds 6 --out benchmarks/results/speed_ab
    python benchmarks/speed_ab.py --summarise benchmarks/results/speed_ab   # from the saved runs only
    python benchmarks/speed_ab.py --new src --rounds 3 --out DIR            # one tree only: its ratios


Writes OUT/{old,new}_R.json (each run's `mrml bench memory --json`), OUT/summary.json, summary.csv and
summary.png (each ratio per round, both trees).
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

TREES = ("old", "new")


def run_round(src: Path, out: Path, bench_args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    cmd = [sys.executable, "-m", "mrml.cli", "bench", "memory", *bench_args, "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def summarise(folder: Path) -> dict:
    ratios: dict[str, dict[str, list[float]]] = {}
    for tree in TREES:  # a tree without runs (one-tree mode) has no median
        for f in sorted(folder.glob(f"{tree}_*.json"), key=lambda p: int(p.stem.split("_")[1])):
            for t in json.loads(f.read_text())["targets"]:
                ratios.setdefault(t["name"], {k: [] for k in TREES})[tree].append(t["value"])
    rows = []
    for name, by in ratios.items():
        old = round(statistics.median(by["old"]), 4) if by["old"] else None
        new = round(statistics.median(by["new"]), 4)
        rows.append({"target": name, "old_median": old, "new_median": new,
                     "change": None if old is None else round(new / old - 1, 4), "rounds": len(by["new"]),
                     "old": by["old"], "new": by["new"]})
    result = {"folder": str(folder), "rows": rows}
    (folder / "summary.json").write_text(json.dumps(result, indent=1))
    with open(folder / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target", "old_median", "new_median", "change", "rounds"])
        for r in rows:
            w.writerow([r["target"], r["old_median"], r["new_median"], r["change"], r["rounds"]])
    for r in rows:
        if r["old_median"] is None:
            print(f"{r['new_median']:8.3f} ({r['rounds']} rounds)  {r['target']}")
        else:
            print(f"{r['old_median']:8.3f} -> {r['new_median']:8.3f} ({100 * r['change']:+5.1f}%, {r['rounds']} rounds)  "
                  f"{r['target']}")
    plot(rows, folder / "summary.png")
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for tree, marker in zip(TREES, "ox"):
            if not r[tree]:
                continue
            ax.plot(range(1, len(r[tree]) + 1), r[tree], marker, label=f"{tree} (median {r[tree + '_median']:.3f})")
        ax.set_title(r["target"], fontsize=7, wrap=True)
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, help="the src/ folder of the baseline tree (optional: without it, --new alone)")
    p.add_argument("--new", type=Path, help="the src/ folder of the tree under test")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/speed_ab"))
    p.add_argument("--bench", default="--algos mrml,anil --steps 20 --variants default --repeats 15",
                   help="arguments of `mrml bench memory` for every round")
    p.add_argument("--summarise", type=Path, default=None, metavar="DIR", help="only summarise the runs saved in DIR")
    ns = p.parse_args(argv)
    if ns.summarise is not None:
        summarise(ns.summarise)
        return 0
    if ns.new is None:
        p.error("--new (a src folder) is needed unless --summarise; --old adds a baseline tree")
    ns.out.mkdir(parents=True, exist_ok=True)
    for r in range(1, ns.rounds + 1):
        for tree, src in (("old", ns.old), ("new", ns.new)):
            if src is None:
                continue
            print(f"round {r}/{ns.rounds}: {tree}", flush=True)
            run_round(src, ns.out / f"{tree}_{r}.json", ns.bench.split())
    summarise(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
