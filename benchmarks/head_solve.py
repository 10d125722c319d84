"""Timings of the batched head solver layer (`mrml.solvers.head`) against a per-task loop of it (T = 1).

For C-way k-shot support sets (n = C k) of random d-dimensional features (d = 64: Conv-4; d = 640:
ResNet-12), T stacked tasks, float32:
- implicit solve H^{-1} B: `HeadProblem.solve` task by task (T = 1) in a loop (dual or primal, Cholesky
  read on the host: the per-task code this layer replaced, removed since; results before that ran it)
  against `HeadProblem.solve` by each form (dual, primal, woodbury; fallback "lu" = no host read, and
  woodbury with fallback "host") and the form the cost rule picks;
- inner solve: `newton_heads` (one host read per iteration, or none: `sync_every=0`) against a loop
  of `newton_heads` on one task at a time, T = 32.
Median seconds over repeats; a combination whose leading flop count is over `--max-gflop` is skipped
and recorded as such.

    OMP_NUM_THREADS=1 python benchmarks/head_solve.py --out benchmarks/results/head_solve/cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mrml.solvers import HeadProblem, newton_heads, solve_costs

CASES = {"5w1s": (5, 1), "20w5s": (20, 5)}


def median_time(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    fn()  # warm-up
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem(t: int, ways: int, shots: int, d: int, lam: float, seed: int = 0) -> tuple[HeadProblem, list[HeadProblem], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = ways * shots
    feats = torch.randn(t, n, d, generator=g).relu()  # post-ReLU trunk features
    labels = torch.arange(ways).repeat(shots).expand(t, n).contiguous()
    w = 0.1 * torch.randn(t, ways, d + 1, generator=g)
    batched = HeadProblem.build(feats, labels, "classification", lam, True)
    per_task = [HeadProblem.build(feats[i : i + 1], labels[i : i + 1], "classification", lam, True, fallback="host")
                for i in range(t)]
    return batched, per_task, w


def run(args: argparse.Namespace) -> dict:
    rows: list[dict] = []
    budget = args.max_gflop * 1e9

    def record(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for case, (ways, shots) in CASES.items():
        for d in (64, 640):
            n, p1 = ways * shots, d + 1
            costs = solve_costs("classification", n, ways, p1)
            host_costs = solve_costs("classification", n, ways, p1, fallback="host")  # Cholesky only (today's primal)
            dense_form = "dual" if n * ways < ways * p1 else "primal"
            for t in (1, 4, 32):
                batched, per_task, w = problem(t, ways, shots, d, args.lam)
                b = torch.randn_like(w)
                pick = batched.form(ways)
                variants: dict[str, tuple[str, Callable[[], object]]] = {
                    "per_task_loop": (dense_form, lambda: [q.solve(w[i : i + 1], b[i : i + 1], form=dense_form)
                                                         for i, q in enumerate(per_task)])}
                for form in ("dual", "primal", "woodbury"):
                    variants[form] = (form, lambda form=form: batched.solve(w, b, form=form))
                host = HeadProblem(batched.feats, batched.targets, "classification", args.lam, fallback="host")
                variants["woodbury_host"] = ("woodbury", lambda: host.solve(w, b, form="woodbury"))
                for name, (form, fn) in variants.items():
                    gflop = t * (host_costs if name in ("per_task_loop", "woodbury_host") else costs)[form] / 1e9
                    base = dict(bench="solve", case=case, d=d, T=t, variant=name, form=form, picked=pick, gflop=round(gflop, 3))
                    if gflop * 1e9 > budget:
                        record(**base, seconds=None, skipped=f"over --max-gflop {args.max_gflop}")
                        continue
                    record(**base, seconds=median_time(fn, args.repeats, args.budget_s))
            t = args.newton_t
            if t and t * host_costs[dense_form] * 6 > 4 * budget:  # ~6 Newton iterations of the per-task loop
                record(bench="newton", case=case, d=d, T=t, seconds=None, skipped=f"over 4 x --max-gflop {args.max_gflop}")
            elif t:
                batched, per_task, w = problem(t, ways, shots, d, args.lam)
                w0 = torch.zeros_like(w)
                _, info = newton_heads(batched, w0, args.max_iter, args.tol)
                its = info.iterations.tolist()
                loop = lambda: [newton_heads(q, w0[i : i + 1], args.max_iter, args.tol) for i, q in enumerate(per_task)]
                base = dict(bench="newton", case=case, d=d, T=t, picked=batched.form(ways), iterations_max=max(its),
                            iterations_mean=sum(its) / len(its))
                record(**base, variant="per_task_loop", seconds=median_time(loop, args.repeats, args.budget_s))
                for sync_every in (1, 0):
                    fn = lambda s=sync_every: newton_heads(batched, w0, args.max_iter, args.tol, sync_every=s)
                    record(**base, variant=f"newton_heads_sync_every_{sync_every}",
                           seconds=median_time(fn, args.repeats, args.budget_s))
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "dtype": "float32",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/head_solve/cpu.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=10.0, help="stop repeating one variant after this many seconds (>= 2 runs)")
    ap.add_argument("--max-gflop", type=float, default=60.0, help="skip a solve whose leading flop count is above this")
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--newton-t", type=int, default=32, help="tasks for the Newton comparison (0: skip it)")
    args = ap.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
