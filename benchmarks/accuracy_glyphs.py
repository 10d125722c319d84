"""Every algorithm on glyphs 5-way 1-shot and 5-way 5-shot: equal outer iterations and task budget,
the same 600 seeded test episodes. Writes benchmarks/results/accuracy_glyphs.{json,md} and the
README table between the `accuracy-table` markers.

    python benchmarks/accuracy_glyphs.py [--iterations 200] [--meta-batch 4] [--algos mrml,maml,...] [--seed S]
    python benchmarks/accuracy_glyphs.py --table-only --seeds 0,1 [--readme]   # mean of seeds

Each run is a fresh `mrml train` process (so peak memory is its own); run folders go to
benchmarks/runs/ (not committed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mrml.cli import replace_options

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Per-algorithm inner-loop settings (their usual values; everything else is shared). For mrml's default
# exact solve, --inner-steps is the Newton iteration cap and --inner-lr, --cg-steps are unused.
SETTINGS: dict[str, list[str]] = {
    "mrml": ["--inner-steps", "20", "--inner-lr", "0.1", "--cg-steps", "20"],
    "itd-bio": ["--inner-steps", "20", "--inner-lr", "0.1"],
    "anil": ["--inner-steps", "10", "--inner-lr", "0.1"],
    "maml": ["--inner-steps", "5", "--inner-lr", "0.4"],
    "fomaml": ["--inner-steps", "5", "--inner-lr", "0.4"],
    "imaml": ["--inner-steps", "20", "--inner-lr", "0.1", "--cg-steps", "5"],
    "reptile": ["--inner-steps", "5", "--inner-lr", "0.1"],
    "protonet": [],
    "metasgd": ["--inner-steps", "5", "--inner-lr", "0.4"],  # MAML's loop; alpha starts at --inner-lr
}
# The inner regulariser swept for the two head-only, l2-regularised methods (the rows "ALGO@l2=V"):
# implicit differentiation assumes the inner problem solved, which a larger l2 makes true in K steps.
# The default mrml (exact solve, lambda learned from 0.1) was chosen on validation among these exact-solve
# forms with lambda fixed, and ITD-BiO's regulariser is swept to the same value.
SWEEP = ["mrml@l2=0.01+no_learn_l2=true", "mrml@no_learn_l2=true", "mrml@l2=1+no_learn_l2=true", "itd-bio@l2=0.1"]
# mrml's other forms at the paper's fixed l2 = 0.01: Algorithm 1 as written (K gd steps + CG), the K-step systems
MRML_ROWS = ["mrml@preset=paper", "mrml@preset=paper+implicit=damped", "mrml@preset=paper+implicit=neumann"]


def settings_of(name: str) -> tuple[str, list[str]]:
    """"ALGO" or "ALGO@key=value+key=value": the algorithm and its `mrml train` options (`key=true`: a
    flag without value, e.g. `mrml@learn_l2=true`)."""
    algo, _, rest = name.partition("@")
    extra = []
    for kv in filter(None, rest.split("+")):
        k, v = kv.split("=", 1)
        extra += ["--" + k.replace("_", "-")] + ([] if v == "true" else [v])
    return algo, replace_options(SETTINGS[algo], extra)  # an option is given once: extra's replace SETTINGS


def run_dir(name: str, shots: int, iterations: int, seed: int = 0) -> Path:
    slug = name.replace("@", "-").replace("=", "_").replace("+", "-")
    return HERE / "runs" / f"glyphs-{slug}-5w{shots}s-it{iterations}{f'-seed{seed}' if seed else ''}"


def validation_accuracy(out: Path) -> float | None:
    """The last validation accuracy in the run's metrics.jsonl (None if it has none)."""
    last = None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "validation":
            last = rec["accuracy"]
    return last


def run_one(name: str, shots: int, args: argparse.Namespace) -> dict:
    out = run_dir(name, shots, args.iterations, args.seed)
    algo, options = settings_of(name)
    if (out / "final.json").exists() and not args.force:
        return json.loads((out / "final.json").read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mrml", "train", "--dataset", "glyphs", "--algo", algo, "--ways", "5",
           "--shots", str(shots), "--query", "15", "--meta-batch", str(args.meta_batch),
           "--iterations", str(args.iterations), "--val-every", str(args.iterations), "--val-episodes", "100",
           "--test-episodes", str(args.episodes), "--seed", str(args.seed), "--no-progress", "--out", str(out),
           *(["--threads", str(args.threads)] if args.threads else []), *options]
    t0, code = time.time(), code_version()
    subprocess.run(cmd, check=True, cwd=ROOT)
    final = json.loads((out / "final.json").read_text())
    final["wall_seconds"] = round(time.time() - t0, 1)
    final["command"] = " ".join(["mrml", *cmd[3:]])
    final["code"] = code
    (out / "final.json").write_text(json.dumps(final, indent=2))
    return final


def cell(r: dict | None) -> str:
    return f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}" if r else "-"


def mean_of_seeds(rows: list[dict]) -> dict:
    """One row from the same configuration trained with several seeds: mean accuracy, and the 95% CI of
    that mean over all their test episodes, sqrt(sum ci_s^2) / S (the spread between training seeds
    is shown beside it, not folded in); mean validation, s/iter and peak MiB."""
    n = len(rows)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"algo": rows[0]["algo"], "shots": rows[0]["shots"], "seeds": [r["seed"] for r in rows],
            "per_seed": [round(r["accuracy"], 6) for r in rows], "accuracy": mean("accuracy"),
            "ci95": sum(r["ci95"] ** 2 for r in rows) ** 0.5 / n, "validation": mean("validation"),
            "seconds_per_iteration": mean("seconds_per_iteration"), "peak_mb": max(r["peak_mb"] for r in rows),
            "episodes": sum(r["episodes"] for r in rows)}


def markdown(rows: list[dict]) -> str:
    multi = any(len(r.get("seeds", [])) > 1 for r in rows)
    head = "| algorithm | 5-way 1-shot | 5-way 5-shot |" + (" per seed (1 / 5-shot) |" if multi else "")
    lines = [head + " validation (1 / 5-shot) | s/iter (1 / 5-shot) | peak MiB (1 / 5-shot) |",
             "|---|---|---|" + ("---|" if multi else "") + "---|---|---|"]
    by = {(r["algo"], r["shots"]): r for r in rows}
    for algo in dict.fromkeys(r["algo"] for r in rows):
        rs = [by.get((algo, shots)) for shots in (1, 5)]
        cells = [cell(r) for r in rs]
        if multi:
            cells.append(" / ".join(", ".join(f"{100 * a:.2f}" for a in r["per_seed"]) if r else "-" for r in rs))
        cells.append(" / ".join(f"{100 * r['validation']:.1f}" if r and r.get("validation") else "-" for r in rs))
        cells.append(" / ".join(f"{r['seconds_per_iteration']:.2f}" if r else "-" for r in rs))
        cells.append(" / ".join(f"{r['peak_mb']:.1f}" if r else "-" for r in rs))
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def code_version() -> str:
    """The git commit the runs were made with ("+dirty" when the tree had changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default=",".join([*SETTINGS, *MRML_ROWS, *SWEEP]),
                   help="comma-separated ALGO or ALGO@option=value+option=value entries (default: every algorithm, "
                        "mrml's forms and the l2 sweep)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=0, help="training seed of the runs to make")
    p.add_argument("--seeds", default=None,
                   help="with --table-only: comma-separated seeds whose finished runs are averaged (mean of seeds)")
    p.add_argument("--shots", default="1,5", help="comma-separated shots to run (results of both are tabled)")
    p.add_argument("--threads", type=int, default=None, help="passed to every run as --threads (default: not passed)")
    p.add_argument("--table-only", action="store_true", help="only gather finished runs into the table")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    p.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    if len(seeds) > 1 and not args.table_only:
        p.error("--seeds averages finished runs: use it with --table-only (make runs with --seed)")
    rows = []
    todo = [int(s) for s in args.shots.split(",")]
    for shots in (1, 5):
        for algo in args.algos.split(","):
            per_seed = []
            for seed in seeds:
                done = run_dir(algo, shots, args.iterations, seed) / "final.json"
                if shots not in todo or args.table_only:
                    if not done.exists():
                        continue
                    f = json.loads(done.read_text())
                else:
                    args.seed = seed
                    f = run_one(algo, shots, args)
                f["validation"] = validation_accuracy(done.parent)
                per_seed.append({"algo": algo, "shots": shots, "seed": seed, **{k: f.get(k) for k in ("validation",
                    "accuracy", "ci95", "episodes", "seconds_per_iteration", "peak_mb", "seconds", "wall_seconds", "command", "code")}})
                print(f"{algo:9s} 5w{shots}s seed {seed}  {100 * f['accuracy']:.2f} ± {100 * f['ci95']:.2f}  "
                      f"{f['seconds_per_iteration']:.3f} s/it  {f['peak_mb']} MiB", flush=True)
            if len(seeds) > 1 and len(per_seed) == len(seeds):
                rows.append({**mean_of_seeds(per_seed), "runs": per_seed})
            elif len(seeds) == 1 and per_seed:
                rows.append(per_seed[0])
    settings = {"dataset": "glyphs", "ways": 5, "query": 15, "iterations": args.iterations,
                "meta_batch": args.meta_batch, "test_episodes": args.episodes, "seeds": seeds,
                "per_algorithm": SETTINGS, "mrml_rows": MRML_ROWS, "sweep": SWEEP}
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = "accuracy_glyphs" + ("_seeds" + "".join(map(str, seeds)) if len(seeds) > 1 else
                                (f"_seed{seeds[0]}" if seeds[0] else ""))
    (results / f"{stem}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    (results / f"{stem}.md").write_text(table + "\n")
    print(table)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = "<!-- accuracy-table -->", "<!-- /accuracy-table -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            readme.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
