"""Seconds per meta-iteration and peak memory of mrml's forms in the paper's setting.

Setting (Yang, Ma & Yu, AAAI 2025): Conv-4-64 on 32x32x3 images (random here: speed does not depend
on the pixels), 5-way 5-shot episodes with 5 query images per class, a meta-batch of 32 tasks, K = 20
and K = 50 inner steps, N = 20 conjugate-gradient steps, one Adam step per meta-iteration.

Configurations (all in this process, each with its own freshly built model):
- `per-task`: mrml with task_chunk 1, the loop over tasks (the default on CPU);
- `chunk C` (4, 8, 32): mrml with task_chunk C, the task-batched path (`mrml.algorithms.batched`);
- `anil`: efficient ANIL (`mrml.algorithms.ALGORITHMS["anil"]`, trunk once per task, K unrolled head
  steps), skipped with a note when that algorithm is not registered;
- `paper-faithful`: mrml with recompute_features=True (the whole network re-run in every inner step
  and every Hessian-vector product, tasks one at a time).

Per K, every configuration is built (seeded Conv-4, Adam), warmed up with one meta-iteration on 2
tasks, and measured for memory by one meta-iteration under `mrml.memory.PeakMemoryMeter` on its first
max(2, C) tasks -- one chunk: chunks run one after another, so a meta-iteration's peak is its largest
chunk's. Then the timed meta-iterations over the whole meta-batch run in rounds over the
configurations, interleaved, so that a change in the machine's load hits them alike; the median is
reported. Defaults on CPU (the machine is a shared 2-core one): 1 thread (two threads on a loaded
2-core machine run several times slower than one), 1 timed iteration per configuration plus 2 more for
per-task and anil (the 1.15x target compares them), and the paper-faithful loop -- which runs tasks one
after another, independently -- timed on 8 of the 32 tasks and scaled by 4 (marked `*`), so that the
default run stays within about 10 minutes. On an idle machine pass e.g. `--threads 2 --repeats 3
--faithful-tasks 0`. On CUDA the defaults are 5 repeats, every configuration timed in full.

Step function, device sync, warm-up, metered and timed steps, the target ratio check, the table
layout and the figure come from `mrml.harness` (shared with `mrml bench memory`).

Targets printed (PASS/FAIL, honestly): the per-task loop at least 4x faster than the paper-faithful
loop at K=20 and 8x at K=50 and within 1.15x of efficient ANIL; on CUDA, chunk 32 at least 3x faster
than the per-task loop (on CPU one big batch is slower than tasks one at a time: not a target there).

    python benchmarks/speed.py [--device cpu|cuda] [--repeats R] [--quick] [--out PATH.json]

Writes PATH.json and a bar chart PATH.png (default benchmarks/results/speed_<device>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mrml import harness
from mrml.algorithms import ALGORITHMS, AlgoConfig
from mrml.config import RunConfig
from mrml.data.base import Episode
from mrml.models import build_model
from mrml.settings import help_of

ROOT = Path(__file__).resolve().parent


def make_episodes(n: int, ways: int, shots: int, query: int, shape: tuple[int, ...], device: str,
                  seed: int = 0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    labels_s = torch.arange(ways).repeat_interleave(shots)
    labels_q = torch.arange(ways).repeat_interleave(query)
    return [Episode(torch.randn(ways * shots, *shape, generator=g), labels_s,
                    torch.randn(ways * query, *shape, generator=g), labels_q).to(device) for _ in range(n)]


def configurations(chunks: list[int]) -> list[dict[str, Any]]:
    out = [{"name": "per-task", "algo": "mrml", "config": {}, "chunk": 1,
            "what": "mrml, task_chunk 1: the loop over tasks"}]
    out += [{"name": f"chunk {c}", "algo": "mrml", "config": {"task_chunk": c}, "chunk": c,
             "what": f"mrml, task_chunk {c}: task-batched"} for c in chunks if c > 1]
    out.append({"name": "anil", "algo": "anil", "config": {}, "chunk": 1,
                "what": "efficient ANIL: trunk once per task, K unrolled head steps"})
    out.append({"name": "paper-faithful", "algo": "mrml", "config": {"recompute_features": True}, "chunk": 1,
                "what": "mrml, recompute_features: whole network re-run in every inner step and HVP"})
    return out


class Runner:
    """One configuration at one K: model, algorithm, Adam; warm-up and memory done at construction."""

    def __init__(self, conf: dict[str, Any], steps: int, eps: list[Episode], s: argparse.Namespace):
        self.s, self.eps = s, eps
        self.rec: dict[str, Any] = {"name": conf["name"], "algo": conf["algo"], "inner_steps": steps,
                                    "chunk": conf["chunk"], "config": conf["config"], "what": conf["what"], "times_s": []}
        self.repeats = s.repeats + (s.pair_repeats if conf["name"] in ("per-task", "anil") else 0)
        self.tasks = len(eps)
        if conf["name"] == "paper-faithful" and s.faithful_tasks:
            self.tasks = min(len(eps), s.faithful_tasks)
        torch.manual_seed(0)
        model = build_model("conv4", tuple(s.shape), s.ways, s.width).to(s.device)
        cfg = AlgoConfig(inner_steps=steps, cg_steps=s.cg_steps, plain_inner=s.plain_inner, **conf["config"])
        self.algo = ALGORITHMS[conf["algo"]](model, "classification", cfg)
        self.opt = torch.optim.Adam(self.algo.outer_parameters(), lr=1e-3)
        self.iteration = harness.meta_step(self.algo, self.opt)
        self.rec["warmup_s"] = harness.warm_up(self.iteration, eps[:2], s.device)  # Adam's state, lazy initialisation
        first = eps[: max(2, conf["chunk"])]  # one chunk: the peak of a meta-iteration is its largest chunk's
        rep, _ = harness.metered(self.iteration, first, s.device)
        self.rec.update(peak_mb=rep.peak_mb, cuda_peak_mb=rep.cuda_peak_mb, memory_tasks=len(first))

    def time_once(self) -> None:
        seconds, self.rec["loss"] = harness.timed(self.iteration, self.eps[: self.tasks], self.s.device)
        self.rec["times_s"].append(seconds)

    def record(self) -> dict[str, Any]:
        rec = self.rec
        if rec["times_s"]:
            rec["timed_tasks"] = self.tasks
            rec["seconds"] = statistics.median(rec["times_s"]) * len(self.eps) / self.tasks
            if self.tasks < len(self.eps):
                rec["extrapolated"] = (f"timed on {self.tasks} of {len(self.eps)} tasks and scaled by "
                                       f"{len(self.eps) / self.tasks:g}: tasks run one after another, independently")
        return rec


def failure(conf: dict[str, Any], steps: int, e: BaseException) -> dict[str, Any]:
    return {"name": conf["name"], "algo": conf["algo"], "inner_steps": steps, "chunk": conf["chunk"],
            "config": conf["config"], "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
            "traceback": traceback.format_exc(limit=3)}


def measure_all(k: int, confs: list[dict[str, Any]], eps: list[Episode], s: argparse.Namespace) -> list[dict[str, Any]]:
    """All configurations at one K: each is built, warmed up and measured for memory; then the timed
    meta-iterations run in rounds over the configurations (interleaved, so that a change of the
    machine's load hits them alike); the median of each configuration's times is reported."""
    runners: list[Runner | dict[str, Any]] = []
    for conf in confs:
        t = time.perf_counter()
        if conf["algo"] not in ALGORITHMS:
            runners.append({"name": conf["name"], "algo": conf["algo"], "inner_steps": k, "chunk": conf["chunk"],
                            "config": conf["config"],
                            "skipped": f"algorithm {conf['algo']!r} is not registered in mrml.algorithms.ALGORITHMS"})
            print(f"  K={k:<3} {conf['name']:<15} skipped: {runners[-1]['skipped']}", flush=True)
            continue
        try:
            runners.append(Runner(conf, k, eps, s))
            print(f"  K={k:<3} {conf['name']:<15} peak {runners[-1].rec['peak_mb']:.1f} MiB "
                  f"(warm-up and memory {time.perf_counter() - t:.0f} s)", flush=True)
        except Exception as e:  # e.g. out of memory: record it, go on
            runners.append(failure(conf, k, e))
            print(f"  K={k:<3} {conf['name']:<15} {runners[-1]['error']}", flush=True)
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
    rounds = max([r.repeats for r in runners if isinstance(r, Runner)], default=0)
    for i in range(rounds):
        for j, r in enumerate(runners):
            if isinstance(r, Runner) and i < r.repeats:
                try:
                    r.time_once()
                except Exception as e:
                    runners[j] = failure({"name": r.rec["name"], "algo": r.rec["algo"], "chunk": r.rec["chunk"],
                                          "config": r.rec["config"]}, k, e)
        done = ", ".join(f"{r.rec['name']} {r.rec['times_s'][-1]:.2f}" for r in runners
                         if isinstance(r, Runner) and i < r.repeats and r.rec["times_s"])
        print(f"  K={k:<3} round {i + 1}/{rounds} (s/iter as timed): {done}", flush=True)
    return [r.record() if isinstance(r, Runner) else r for r in runners]


def find(records: list[dict[str, Any]], name: str, steps: int) -> dict[str, Any] | None:
    for r in records:
        if r["name"] == name and r["inner_steps"] == steps and "seconds" in r:
            return r
    return None


def targets(records: list[dict[str, Any]], steps: list[int], device: str, quick: bool) -> list[dict[str, Any]]:
    """Each target: the measured ratio of seconds, the bound, PASS/FAIL (or n/a with the reason)."""
    out = []

    def add(what: str, slow: dict | None, fast: dict | None, op: str, bound: float, applies: bool = True,
            why: str = "") -> None:
        t: dict[str, Any] = {"target": what, "ratio": None, "op": op, "bound": bound}
        if not applies:
            t.update(status="n/a", note=why)
        elif slow is None or fast is None:
            t.update(status="n/a", note="a configuration is missing (skipped or failed)")
        else:
            t["ratio"], ok = harness.ratio_check(slow["seconds"], fast["seconds"], op, bound)
            t["status"] = "PASS" if ok else "FAIL"
        if quick:
            t["note"] = (t.get("note", "") + " (quick run: not the paper's setting)").strip()
        out.append(t)

    faithful = {20: 4.0, 50: 8.0}
    for k in steps:
        pt = find(records, "per-task", k)
        if k in faithful:
            add(f"K={k}: paper-faithful / per-task loop", find(records, "paper-faithful", k), pt, ">=", faithful[k])
        add(f"K={k}: per-task loop / efficient ANIL", pt, find(records, "anil", k), "<=", 1.15,
            applies="anil" in ALGORITHMS, why="algorithm 'anil' not registered")
        add(f"K={k}: per-task loop / chunk 32 (CUDA)", pt, find(records, "chunk 32", k), ">=", 3.0,
            applies=device.startswith("cuda"),
            why="a CUDA target; on CPU one big batch is slower than tasks one at a time (the default is chunk 1)")
    return out


def table(records: list[dict[str, Any]], steps: list[int]) -> str:
    names = list(dict.fromkeys(r["name"] for r in records))
    head = harness.columns([("configuration", -16)] + [c for k in steps for c in
                                                       ((f"K={k} s/iter", 13), ("x per-task", 11), ("peak MB", 10))])
    rows = []
    for n in names:
        cells: list[tuple[str, int]] = [(n, -16)]
        for k in steps:
            r = next((x for x in records if x["name"] == n and x["inner_steps"] == k), None)
            pt = find(records, "per-task", k)
            if r is None or "seconds" not in r:
                why = "skipped" if r is not None and "skipped" in r else "error" if r is not None else "-"
                cells += [(why, 13), ("", 11), ("", 10)]
                continue
            speed = f"{pt['seconds'] / r['seconds']:.2f}x" if pt else "-"
            secs = f"{r['seconds']:.2f}" + ("*" if r.get("extrapolated") else "")
            cells += [(secs, 13), (speed, 11), (f"{r['peak_mb']:.1f}", 10)]
        rows.append(harness.columns(cells))
    return harness.table(head, rows)


def plot(result: dict[str, Any], path: Path) -> None:
    records, steps = result["records"], result["settings"]["steps"]
    names = list(dict.fromkeys(r["name"] for r in records))
    fig, axes = harness.two_panels((12, 4.2))
    width = 0.8 / max(1, len(steps))
    for ax, key in zip(axes, ("seconds", "peak_mb")):
        label = harness.PANEL_LABELS[key]
        for i, k in enumerate(steps):
            vals, marks = [], []
            for n in names:
                r = next((x for x in records if x["name"] == n and x["inner_steps"] == k), None)
                vals.append(r[key] if r is not None and key in r else 0.0)
                marks.append("*" if key == "seconds" and r is not None and r.get("extrapolated") else "")
            xs = [p + (i - (len(steps) - 1) / 2) * width for p in range(len(names))]
            bars = ax.bar(xs, vals, width, label=f"K={k}")
            for b, v, m in zip(bars, vals, marks):
                if v:
                    text = f"{v:.0f}" if v >= 100 else f"{v:.3g}"
                    ax.annotate(text + m, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.set_ylabel(label)
        if key == "seconds":
            ax.set_yscale("log")
            if any(marks):
                ax.set_xlabel("* timed on part of the meta-batch, scaled (tasks run one after another)", fontsize=8)
        ax.legend()
    st = result["settings"]
    fig.suptitle(f"mrml speed: Conv-4-{st['width']}, {st['ways']}-way {st['shots']}-shot, meta-batch "
                 f"{st['meta_batch']}, {result['device_name']} ({st['threads']} thread(s))"
                 + (" [quick]" if st["quick"] else ""), fontsize=10)
    fig.tight_layout()
    harness.save(fig, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-iterations (median); default 1 on CPU, 5 on CUDA")
    p.add_argument("--quick", action="store_true", help="a smoke run: meta-batch 4, K 5 and 10, chunks 2 and 4")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed_<device>[_quick].json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1, see the docstring)")
    p.add_argument("--steps", default=None, help="inner steps K, comma-separated (default 20,50)")
    p.add_argument("--chunks", default=None, help="task chunks of the batched path (default 4,8,32)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-iteration (default 32)")
    p.add_argument("--pair-repeats", type=int, default=None,
                   help="extra timed iterations of per-task and anil (the 1.15x target); default 2 on CPU, 0 on CUDA")
    p.add_argument("--faithful-tasks", type=int, default=None,
                   help="time the paper-faithful loop on this many tasks and scale to the meta-batch (it runs tasks "
                        "one after another); default 8 on CPU, all on CUDA; 0: all")
    p.add_argument("--width", type=int, default=64, help=help_of(RunConfig, "width") + " (here: 64, the paper's)")
    p.add_argument("--cg-steps", type=int, default=AlgoConfig.cg_steps, help=help_of(AlgoConfig, "cg_steps"))
    p.add_argument("--plain-inner", action="store_true", help=help_of(AlgoConfig, "plain_inner") + " (every configuration)")
    s = p.parse_args(argv)
    s.ways, s.shots, s.query, s.shape = 5, 5, 5, [3, 32, 32]
    s.steps = [int(x) for x in (s.steps or ("5,10" if s.quick else "20,50")).split(",")]
    s.chunks = [int(x) for x in (s.chunks or ("2,4" if s.quick else "4,8,32")).split(",")]
    s.meta_batch = s.meta_batch or (4 if s.quick else 32)
    cuda = s.device.startswith("cuda")
    if s.repeats is None:
        s.repeats = 1 if (s.quick or not cuda) else 5
    if s.pair_repeats is None:
        s.pair_repeats = 0 if (s.quick or cuda) else 2
    if s.faithful_tasks is None:
        s.faithful_tasks = 0 if (s.quick or cuda) else 8
    if s.device.startswith("cpu"):
        s.threads = s.threads or 1
        torch.set_num_threads(s.threads)
    else:
        s.threads = torch.get_num_threads()
    tag = s.device.split(":")[0] + ("_quick" if s.quick else "")
    s.out = Path(s.out) if s.out else ROOT / "results" / f"speed_{tag}.json"
    return s


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    device_name = torch.cuda.get_device_name(s.device) if s.device.startswith("cuda") else (platform.processor() or "cpu")
    print(f"device {s.device} ({device_name}), threads {s.threads}, repeats {s.repeats} (+{s.pair_repeats} for "
          f"per-task and anil), paper-faithful timed on {s.faithful_tasks or s.meta_batch} tasks, meta-batch {s.meta_batch}, "
          f"K {s.steps}, chunks {s.chunks}, load average {os.getloadavg()[0]:.2f}" + (" [quick]" if s.quick else ""),
          flush=True)
    eps = make_episodes(s.meta_batch, s.ways, s.shots, s.query, tuple(s.shape), s.device)
    records = []
    start = time.perf_counter()
    confs = configurations([c for c in s.chunks if c <= s.meta_batch])
    for k in s.steps:
        records += measure_all(k, confs, eps, s)
    ts = targets(records, s.steps, s.device, s.quick)
    result = {
        "settings": {"steps": s.steps, "chunks": s.chunks, "meta_batch": s.meta_batch, "ways": s.ways, "shots": s.shots,
                     "query": s.query, "shape": s.shape, "width": s.width, "cg_steps": s.cg_steps,
                     "plain_inner": s.plain_inner,
                     "repeats": s.repeats, "pair_repeats": s.pair_repeats, "faithful_tasks": s.faithful_tasks,
                     "threads": s.threads, "quick": s.quick, "backbone": "conv4",
                     "optimizer": "Adam step included in each meta-iteration",
                     "memory": "PeakMemoryMeter over one meta-iteration on the first max(2, chunk) tasks (one chunk)",
                     "timing": "median of the timed meta-iterations, run in interleaved rounds over the configurations"},
        "device": s.device, "device_name": device_name, "torch": torch.__version__, "python": sys.version.split()[0],
        "load_average": os.getloadavg(), "total_seconds": time.perf_counter() - start,
        "records": records, "targets": ts,
    }
    print()
    print(table(records, s.steps))
    if any(r.get("extrapolated") for r in records):
        print(f"* timed on {s.faithful_tasks} of {s.meta_batch} tasks, scaled (tasks run one after another)")
    print()
    for t in ts:
        ratio = f"{t['ratio']:.2f} (need {t['op']} {t['bound']:g})" if t["ratio"] is not None else ""
        print(f"{t['status']:<5} {t['target']}: {ratio} {t.get('note', '')}".rstrip())
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=2) + "\n")
    png = s.out.with_suffix(".png")
    plot(result, png)
    print(f"\nwrote {s.out} and {png} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
