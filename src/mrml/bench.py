"""`mrml bench memory`: peak memory and seconds per meta-iteration against the number of inner steps K.

For every algorithm, variant and K, one *configuration* is measured in a fresh Python process
(`python -m mrml.bench _one '<json>'`, which prints one JSON record), so that nothing -- allocator
caches, autograd state, threads -- leaks from one configuration into the next, and a configuration
that crashes, runs out of memory or exceeds `--timeout` is recorded with an `error` field instead of
ending the benchmark.

What one configuration measures (`measure`):
- the model, algorithm and Adam optimizer are built as `mrml train` builds them (`RunConfig` defaults,
  seeded model init); `2 + repeats` meta-batches of episodes are drawn up front from the seeded
  training episode stream (episode b of step t is `episode_rng(seed, "train", t * meta_batch + b)`);
- step 0 is a warm-up (not measured): afterwards Adam's moment buffers exist;
- step 1 runs under `mrml.memory.PeakMemoryMeter`: peak_mb is the peak of the bytes allocated during
  one meta-gradient plus optimizer step, above what existed before it. Counted: every tensor storage
  created during the step -- activations, autograd graphs, inner-loop and CG temporaries, the fresh
  `.grad` buffers (every algorithm, and the floor, sets `.grad` to None at the start of a step, so
  they are re-allocated and counted alike for all) and the optimizer's temporaries. Not counted:
  parameters, the episode tensors and Adam's persistent state (allocated in the warm-up). Views are
  not new memory (the meter counts storages). On CUDA `cuda_peak_mb` is the allocator's
  max_memory_allocated over the same step, as a cross-check;
- steps 2 .. repeats+1 are timed without the meter (`time.perf_counter`, with
  `torch.cuda.synchronize` around each step on CUDA): `seconds` is their median.
  Threads: torch's default (all cores) unless `--threads` is given; the record says how many.
  A record's `wall_s` is the child's own time for the configuration (building, episodes, all steps),
  without interpreter start-up and imports.

The step function, device sync, warm-up, metered and timed steps, the ratio behind each target, the
table layout and the figure are `mrml.harness`'s, shared with benchmarks/speed.py.

The *floor* (algo "floor") is the least any of them can use: the same images through backbone and
head with the plain task loss, support and query sets forwarded separately as the algorithms'
trunks do, one backward per task, tasks one at a time, then the optimizer step; same meter.

Variants: "default" (the efficient form: the trunk runs once per task), "paper" (mrml: Algorithm 1
as written, K gradient steps and N CG steps, instead of the default exact solve), "recompute" (the
paper-faithful form that re-runs the backbone in every inner step: mrml, anil, itd-bio), and for
mrml "last-block" (last backbone block + head adapted), "all" (the whole network: the iMAML form) and
"last-block-projected" (`--project-head`: the head solved exactly, then K steps on last block + head).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from . import harness
from .algorithms.algo_config import STEPS_MAX, AlgoConfig
from .config import RunConfig
from .errors import UsageError
from .settings import add_options, check_settings, like, setting
from .validation import floats, ints

# variant name -> RunConfig settings it changes
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"inner_solver": "gd", "implicit": "cg"},  # mrml: Algorithm 1 as written (K gd steps, N CG steps)
    "recompute": {"recompute_features": True, "inner_solver": "gd", "implicit": "cg"},
    "last-block": {"inner": "last-block"},
    "last-block-newton": {"inner": "last-block", "inner_solver": "newton"},  # exact (Newton-CG) solve of the proximal problem
    "all": {"inner": "all"},
    # the meta-trained wider form: head solved exactly, K gd steps on last block + head, neumann K-step system
    "last-block-projected": {"inner": "last-block", "project_head": True},
}
# variants beyond "default" that make sense for an algorithm (others: "default" only)
APPLICABLE: dict[str, tuple[str, ...]] = {
    "mrml": ("default", "paper", "recompute", "last-block", "last-block-newton", "all", "last-block-projected"),
    "anil": ("default", "recompute", "last-block"),
    "itd-bio": ("default", "recompute"),
    "maml": ("default", "last-block"),  # last-block: the unrolled baselines adapting what --project-head adapts
}
FLOOR = "floor"
SYNTHETIC = "synthetic"
DEFAULT_ALGOS = "mrml,maml,anil,itd-bio,imaml"
DEFAULT_STEPS = "1,5,10,20,50,100"
TARGET_K = 20  # the K of the cross-algorithm targets (the paper's default)

PEAK_DEFINITION = (
    "peak bytes allocated during one meta-gradient + optimizer step above what existed before it "
    "(mrml.memory.PeakMemoryMeter, counting tensor storages: views are free); includes the fresh .grad "
    "buffers and optimizer temporaries, excludes parameters, episode tensors and Adam state (made in a "
    "warm-up step)"
)
SECONDS_DEFINITION = "median over the timed repeats of one meta-gradient + optimizer step, after 1 warm-up step and 1 metered step"


@dataclass
class BenchSettings:
    """Everything a configuration's measurement depends on besides (algo, variant, K).

    The options shared with `mrml train` reuse its declarations (help text and range; `like`), with
    the benchmark's own defaults where they differ (5-shot, 5 query, synthetic images).

    Example:
        >>> s = BenchSettings(width=4)
        >>> s.shots, s.cg_steps, s.width
        (5, 20, 4)
    """

    dataset: str = like(RunConfig, "dataset", default=SYNTHETIC,
                        help="synthetic (default: random images, no data needed) or a registered dataset name "
                             "(with --data-root for files on disk)")
    data_root: str | None = like(RunConfig, "data_root")
    image_size: int | None = like(RunConfig, "image_size", help="image side (synthetic default 32; real datasets: "
                                                                "their own size when unset)")
    channels: int = setting(3, "image channels (synthetic)", range=ints(1, 64))
    backbone: str = like(RunConfig, "backbone")
    width: int | None = like(RunConfig, "width")
    ways: int = like(RunConfig, "ways")
    shots: int = like(RunConfig, "shots", default=5)
    query: int = like(RunConfig, "query", default=5)
    meta_batch: int = like(RunConfig, "meta_batch")
    repeats: int = setting(3, "timed meta-steps after the warm-up (median reported)", range=ints(1, 10**4))
    cg_steps: int = like(AlgoConfig, "cg_steps")
    device: str = like(RunConfig, "device")
    seed: int = like(RunConfig, "seed")
    threads: int | None = like(RunConfig, "threads", help="torch threads in each child (default: torch's, all cores)")
    timeout: float = setting(600.0, "seconds allowed per configuration",
                             range=floats(0, 10**7, open_low=True, hint="seconds per configuration"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# one configuration (runs in the child process)
# ------------------------------------------------------------------------------------------------
def synthetic_dataset(shape: tuple[int, int, int], ways: int, per_class: int, seed: int = 0) -> Any:
    """Random uint8 images of `shape` (C, H, W): 2N training classes, N validation and N test classes."""
    import numpy as np

    from .data.base import ArrayClassImages, FewShotDataset

    c, h, w = shape
    rng = np.random.default_rng([int(seed), 0x5EED])

    def part(prefix: str, n: int) -> ArrayClassImages:
        size = (per_class, h, w) if c == 1 else (per_class, h, w, c)
        return ArrayClassImages([f"{prefix}{i}" for i in range(n)],
                                [rng.integers(0, 256, size=size, dtype=np.uint8) for _ in range(n)])

    return FewShotDataset(SYNTHETIC, {"train": part("t", 2 * ways), "validation": part("v", ways), "test": part("s", ways)},
                          info={"synthetic": True})


def make_source(s: BenchSettings) -> Any:
    """The task source: synthetic random images, or a registered dataset (with --data-root)."""
    if s.dataset == SYNTHETIC:
        return synthetic_dataset((s.channels, s.image_size or 32, s.image_size or 32), s.ways, s.shots + s.query, s.seed)
    from .data.registry import build_dataset

    opts: dict[str, Any] = {"seed": s.seed}
    if s.image_size is not None:
        opts["image_size"] = s.image_size
    return build_dataset(s.dataset, s.data_root, **opts)


def build_config(s: BenchSettings, source: Any, algo: str, variant: str, inner_steps: int | None) -> Any:
    """Model, algorithm (None for the floor), optimizer and episode stream, as `mrml train` builds them."""
    import torch

    from .algorithms import build_algorithm
    from .models import build_model
    from .train import Run, pick_device

    cfg = RunConfig(dataset=s.dataset, data_root=s.data_root, image_size=s.image_size, ways=s.ways, shots=s.shots,
                    query=s.query, algo="mrml" if algo == FLOOR else algo, inner_steps=inner_steps or 0,
                    cg_steps=s.cg_steps, backbone=s.backbone, width=s.width, meta_batch=s.meta_batch, seed=s.seed,
                    device=s.device, **VARIANTS[variant])
    device = pick_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    source.check_episode("train", cfg.ways, cfg.shots, cfg.query)
    torch.manual_seed(cfg.seed)
    backbone = cfg.backbone
    try:
        model = build_model(backbone, source.input_shape, source.num_outputs(cfg.ways), cfg.width).to(device, dtype)
    except RuntimeError as e:
        raise UsageError(f"backbone {backbone!r} cannot take inputs of shape {tuple(source.input_shape)}: "
                         f"{str(e).splitlines()[0]}") from None
    if algo == FLOOR:
        alg = None
        params = list(model.parameters())
    else:
        alg = build_algorithm(cfg.algo, model, source.kind, cfg.algo_config())
        params = alg.outer_parameters()
    opt = torch.optim.Adam(params, lr=cfg.outer_lr)
    return Run(cfg, source, model, alg, opt, device, dtype)  # type: ignore[arg-type]


def step_function(run: Any) -> Callable[[list], float]:
    """One meta-iteration (meta-gradient + optimizer step) on a list of episodes; returns the loss."""
    if run.algo is not None:
        return harness.meta_step(run.algo, run.optimizer)

    from .algorithms.losses import TaskLoss

    loss = TaskLoss(run.source.kind)
    model = run.model

    def floor_step(eps: list) -> float:
        for p in model.parameters():
            p.grad = None
        total = 0.0
        for ep in eps:  # tasks one at a time, like the algorithms
            f = loss(model(ep.support_x), ep.support_y) + loss(model(ep.query_x), ep.query_y)
            (f / len(eps)).backward()
            total += float(f.detach()) / 2
        run.optimizer.step()
        return total / len(eps)

    return floor_step


def measure(s: BenchSettings, algo: str, variant: str, inner_steps: int | None) -> dict[str, Any]:
    """Peak memory of one metered step and the median seconds of `repeats` timed steps (see the module doc)."""
    import torch

    t_start = time.perf_counter()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    source = make_source(s)
    run = build_config(s, source, algo, variant, inner_steps)
    dev = run.device
    batches = [run.episodes(t) for t in range(2 + s.repeats)]
    step = step_function(run)
    harness.warm_up(step, batches[0], dev)  # optimizer state exists afterwards
    report, loss = harness.metered(step, batches[1], dev)
    times = []
    for t in range(s.repeats):
        seconds, loss = harness.timed(step, batches[2 + t], dev)
        times.append(seconds)
    rec: dict[str, Any] = {
        "algo": algo, "variant": variant, "inner_steps": inner_steps,
        "peak_mb": round(report.peak_mb, 3), "seconds": round(statistics.median(times), 5),
        "device": str(dev), "meter": "dispatch",
    }
    if report.cuda_peak_mb is not None:
        rec["cuda_peak_mb"] = round(report.cuda_peak_mb, 3)
    rec["seconds_all"] = [round(t, 5) for t in times]
    if run.algo is not None:
        rec["inner"] = run.algo.config.inner
        rec["recompute_features"] = bool(run.algo.config.recompute_features)
        rec["prox"] = bool(run.algo.prox)
        rec["inner_parameters"] = sum(p.numel() for p in run.algo.split.inner_parameters())
    rec["parameters"] = sum(p.numel() for p in run.model.parameters())
    rec["loss"] = round(float(loss), 6)
    rec["threads"] = torch.get_num_threads()
    rec["wall_s"] = round(time.perf_counter() - t_start, 3)
    return rec


def base_record(algo: str, variant: str, inner_steps: int | None, device: str) -> dict[str, Any]:
    return {"algo": algo, "variant": variant, "inner_steps": inner_steps, "peak_mb": None, "seconds": None,
            "device": device, "meter": "dispatch"}


def measure_safely(s: BenchSettings, algo: str, variant: str, inner_steps: int | None) -> dict[str, Any]:
    """`measure`, or a record with `error` (one line: exception type and message) if it raised."""
    try:
        return measure(s, algo, variant, inner_steps)
    except Exception as e:  # noqa: BLE001 -- any failure (OOM included) becomes a record
        msg = str(e).strip().splitlines()
        return {**base_record(algo, variant, inner_steps, s.device),
                "error": f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")}


def child_main(argv: list[str]) -> int:
    """`python -m mrml.bench _one '<json>'`: measure one configuration, print its record as one JSON line."""
    if len(argv) != 2 or argv[0] != "_one":
        print("usage: python -m mrml.bench _one '<json configuration>'", file=sys.stderr)
        return 2
    job = json.loads(argv[1])
    s = BenchSettings(**job["settings"])
    rec = measure_safely(s, job["algo"], job["variant"], job["inner_steps"])
    sys.stdout.write("\n" + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------------
# the driver (parent process)
# ------------------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """The parent's environment, with this copy of mrml first on the path of the child."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_in_subprocess(s: BenchSettings, algo: str, variant: str, inner_steps: int | None) -> dict[str, Any]:
    """Measure one configuration in a fresh Python process; failures come back as records with `error`."""
    job = json.dumps({"settings": s.to_dict(), "algo": algo, "variant": variant, "inner_steps": inner_steps})
    cmd = [sys.executable, "-m", "mrml.bench", "_one", job]
    base = base_record(algo, variant, inner_steps, s.device)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {s.timeout:g} s (--timeout)", "wall_s": round(time.perf_counter() - t0, 3)}
    rec = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    if rec is None:
        if proc.returncode < 0:
            sig = -proc.returncode
            why = f"killed by signal {sig}" + (" (out of memory?)" if sig == 9 else "")
        else:
            why = f"exit code {proc.returncode}"
        tail = _last_line(proc.stderr)
        rec = {**base, "error": why + (f": {tail}" if tail else "")}
    rec.setdefault("wall_s", round(time.perf_counter() - t0, 3))
    return rec


def parse_skip(text: str | None, algos: list[str]) -> list[tuple[str, str | None, int]]:
    """`--skip maml:100,anil/recompute:100` -> [(algo, variant or None for all variants, K)]."""
    if text is None:
        return []
    out = []
    for item in _csv(text, "skip"):
        name, _, k = item.partition(":")
        algo, _, variant = name.partition("/")
        try:
            steps = int(k)
        except ValueError:
            raise UsageError(f"--skip expects ALGO[/VARIANT]:K entries such as maml:100 (got {item!r})") from None
        if algo not in algos:
            raise UsageError(f"--skip {item}: {algo!r} is not among --algos ({', '.join(algos)})")
        if variant and variant not in VARIANTS:
            raise UsageError(f"--skip {item}: unknown variant {variant!r} (expected one of {', '.join(VARIANTS)})")
        out.append((algo, variant or None, steps))
    return out


def plan(algos: list[str], variants: list[str] | None, steps: list[int],
         skip: list[tuple[str, str | None, int]] = ()) -> list[tuple[str, str, int | None]]:
    """The configurations, floor first: (algo, variant, K); K is None for the floor. `skip` drops some."""
    jobs: list[tuple[str, str, int | None]] = [(FLOOR, "default", None)]
    for a in algos:
        if a == FLOOR:
            continue
        applicable = APPLICABLE.get(a, ("default",))
        chosen = [v for v in applicable if variants is None or v in variants]
        if not chosen:
            raise UsageError(f"no chosen --variants apply to {a} (it has: {', '.join(applicable)})")
        jobs += [(a, v, k) for v in chosen for k in steps
                 if not any(sa == a and sv in (None, v) and sk == k for sa, sv, sk in skip)]
    return jobs


def _index(records: list[dict[str, Any]]) -> dict[tuple[str, str, int | None], dict[str, Any]]:
    return {(r["algo"], r["variant"], r["inner_steps"]): r for r in records if not r.get("error")
            and r.get("peak_mb") is not None}


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims as ratio checks, for those whose records are present (and did not fail)."""
    ok = _index(records)
    out: list[dict[str, Any]] = []

    def add(name: str, num: dict, den: dict, key: str, threshold: float) -> None:
        if not den[key]:
            return
        value, ok = harness.ratio_check(num[key], den[key], "<=", threshold)
        out.append({"name": name, "quantity": key, "value": round(value, 4), "threshold": threshold,
                    "pass": ok,
                    "numerator": [num["algo"], num["variant"], num["inner_steps"], num[key]],
                    "denominator": [den["algo"], den["variant"], den["inner_steps"], den[key]]})

    for variant, what in (("default", "head only"), ("all", "whole network")):
        ks = sorted(k for (a, v, k) in ok if a == "mrml" and v == variant and k is not None)
        if len(ks) >= 2:
            add(f"mrml peak K={ks[-1]} / K={ks[0]} ({what}, flat in K)", ok["mrml", variant, ks[-1]],
                ok["mrml", variant, ks[0]], "peak_mb", 1.02)
    k = TARGET_K
    mrml_k = ok.get(("mrml", "default", k))
    if mrml_k is not None and ("maml", "default", k) in ok:
        add(f"mrml peak / MAML peak at K={k}", mrml_k, ok["maml", "default", k], "peak_mb", 0.10)
    if mrml_k is not None and ("anil", "recompute", k) in ok:
        add(f"mrml peak / paper-faithful ANIL (recompute) peak at K={k}", mrml_k, ok["anil", "recompute", k], "peak_mb", 0.25)
    floor = ok.get((FLOOR, "default", None))
    mrml_all = [r for (a, v, _), r in ok.items() if a == "mrml" and v == "default"]
    if floor is not None and mrml_all:
        worst = max(mrml_all, key=lambda r: r["peak_mb"])
        add(f"mrml peak (largest over K, K={worst['inner_steps']}) / floor", worst, floor, "peak_mb", 1.05)
    if mrml_k is not None and ("mrml", "paper", k) in ok:
        add(f"mrml peak / mrml paper form (gd + CG) peak at K={k}", mrml_k, ok["mrml", "paper", k], "peak_mb", 1.02)
    if mrml_k is not None and floor is not None:
        add(f"mrml seconds at K={k} / floor seconds", mrml_k, floor, "seconds", 1.2)
    if mrml_k is not None and ("anil", "default", k) in ok:
        add(f"mrml seconds / efficient ANIL seconds at K={k}", mrml_k, ok["anil", "default", k], "seconds", 1.0)
    if mrml_k is not None and ("mrml", "recompute", k) in ok:
        add(f"mrml seconds / paper-faithful mrml loop (recompute) seconds at K={k}", mrml_k,
            ok["mrml", "recompute", k], "seconds", 0.25)
    return out


def target_lines(ts: list[dict[str, Any]]) -> list[str]:
    return [f"target {t['name']} <= {t['threshold']:g}: {t['value']:.3f} ({'PASS' if t['pass'] else 'FAIL'})" for t in ts]


def table(records: list[dict[str, Any]]) -> str:
    cuda = any("cuda_peak_mb" in r for r in records)
    widths = [("algo", -10), ("variant", -11), ("K", 5), ("peak MB", 10)] + ([("cuda MB", 10)] if cuda else [])
    rows = []
    for r in records:
        k = "-" if r["inner_steps"] is None else str(r["inner_steps"])
        first = harness.columns([(r["algo"], -10), (r["variant"], -11), (k, 5)], sep=" ")
        if r.get("error"):
            rows.append(f"{first}  error: {r['error']}")
            continue
        cells = [(f"{r['peak_mb']:.2f}", 10)]
        if cuda:
            c = r.get("cuda_peak_mb")
            cells.append((f"{c:.2f}" if c is not None else "-", 10))
        rows.append(first + " " + harness.columns(cells + [(f"{r['seconds']:.4f}", 10)], sep=" "))
    return harness.table(harness.columns(widths + [("s/iter", 10)], sep=" "), rows)


def title(settings: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in settings.get("input_shape", []))
    return (f"{settings.get('device_name') or settings['device']} ({settings['device']}, {settings.get('threads')} thread{'' if settings.get('threads') == 1 else 's'}) - "
            f"{settings['backbone']}-{settings['width']}, {shape} {settings['dataset']} images, {settings['ways']}-way "
            f"{settings['shots']}-shot, {settings['query']} query, meta-batch {settings['meta_batch']}, "
            f"median of {settings['repeats']}, torch {settings.get('torch')}")


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Two panels, peak MB and seconds per meta-iteration against K (log-log), floor as a horizontal line."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    records = [r for r in result["records"] if not r.get("error") and r.get("peak_mb") is not None]
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["algo"] != FLOOR:
            series.setdefault((r["algo"], r["variant"]), []).append(r)
    floor = next((r for r in records if r["algo"] == FLOOR), None)
    algos = list(dict.fromkeys(a for a, _ in series))
    colors = {a: f"C{i % 10}" for i, a in enumerate(algos)}
    styles = {"default": ("-", "o"), "recompute": ("--", "s"), "last-block": (":", "^"), "all": ("-.", "D"),
              "last-block-projected": ("--", "v")}
    fig, axes = harness.two_panels((13, 5.6))
    for ax, key in zip(axes, ("peak_mb", "seconds")):
        label = harness.PANEL_LABELS[key]
        for (a, v), rs in series.items():
            rs = sorted(rs, key=lambda r: r["inner_steps"])
            ls, mk = styles.get(v, ("-", "x"))
            name = a if v == "default" else f"{a} ({v})"
            ax.plot([r["inner_steps"] for r in rs], [r[key] for r in rs], ls, marker=mk, color=colors[a], label=name,
                    markersize=4)
        if floor is not None:
            ax.axhline(floor[key], color="black", linestyle=(0, (1, 2)), linewidth=1.2,
                       label=f"floor: plain forward+backward ({floor[key]:.3g})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ks = sorted({r["inner_steps"] for rs in series.values() for r in rs})
        if ks:
            ax.set_xticks(ks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_xlabel("inner steps K")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    failed = [r for r in result["records"] if r.get("error")]
    note = f" ({len(failed)} configuration(s) failed, see JSON)" if failed else ""
    fig.suptitle("Peak memory and time per meta-iteration vs inner steps K" + note + "\n" + title(result["settings"]),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    harness.save(fig, path)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{what} expects a comma-separated list (got {text!r})")
    return list(dict.fromkeys(items))


def parse_steps(text: str) -> list[int]:
    out = []
    for t in _csv(text, "steps"):
        try:
            k = int(t)
        except ValueError:
            raise UsageError(f"--steps expects comma-separated integers >= 1 (got {t!r} in {text!r})") from None
        if not 1 <= k <= STEPS_MAX:  # the range of --inner-steps (AlgoConfig), checked before anything is measured
            raise UsageError(f"--steps expects comma-separated integers >= 1 and <= {STEPS_MAX} (got {k})")
        out.append(k)
    return sorted(set(out))


def _check_output(path: str | None, option: str, plot_file: bool = False) -> Path | None:
    """Fail before measuring anything when an output file cannot be written."""
    if path is None:
        return None
    p = Path(path)
    if plot_file:
        from matplotlib.figure import Figure

        kinds = Figure().canvas.get_supported_filetypes()
        ext = p.suffix.lower().lstrip(".")
        if ext not in kinds:
            raise UsageError(f"{option} {path}: unknown image type {p.suffix or '(none)'!r}; use .png (or one of "
                             f"{', '.join(sorted(kinds))})")
    if p.is_dir():
        raise UsageError(f"{option} {path} is a folder: give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        existed = p.exists()
        with open(p, "a"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise UsageError(f"cannot write {option} {path}: {e.strerror or e}; choose a writable path") from None
    return p


def validate(s: BenchSettings, jobs: list[tuple[str, str, int | None]]) -> dict[str, Any]:
    """Every check that can fail on user input, before the first child starts; returns facts for the settings."""
    import torch

    from .train import pick_device
    check_settings(s)
    dev = pick_device(s.device)
    s.device = str(dev)
    if s.data_root is not None and s.dataset == SYNTHETIC:
        raise UsageError("--data-root is for a real dataset: give --dataset NAME too (default: synthetic images)")
    source = make_source(s)
    source.check_episode("train", s.ways, s.shots, s.query)
    for algo, variant in dict.fromkeys((a, v) for a, v, _ in jobs):
        build_config(s, source, algo, variant, 1)  # raises UsageError for impossible combinations
    if s.width is None:
        from .models.backbones import DEFAULT_WIDTH

        s.width = DEFAULT_WIDTH.get(s.backbone)
    name = platform.processor() or platform.machine()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"input_shape": list(source.input_shape), "device_name": name,
            "threads": s.threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_memory_bench(s: BenchSettings, algos: list[str], variants: list[str] | None, steps: list[int],
                     json_path: str | Path | None = None, plot_path: str | Path | None = None,
                     stream: Any = None, progress: Any = None,
                     skip: list[tuple[str, str | None, int]] = ()) -> tuple[dict[str, Any], int]:
    """Measure every configuration, print the table and targets; returns (result, exit code)."""
    from .checkpoint import atomic_json

    stream = stream or sys.stdout
    progress = progress or sys.stderr
    jobs = plan(algos, variants, steps, skip)
    jp = _check_output(None if json_path is None else str(json_path), "--json")
    pp = _check_output(None if plot_path is None else str(plot_path), "--plot", plot_file=True)
    facts = validate(s, jobs)
    settings = {**s.to_dict(), **facts,
                "warmup": 1, "algos": algos, "variants": variants or "all applicable", "steps": steps,
                "skipped": [f"{a}{'/' + v if v else ''}:{k}" for a, v, k in skip], "dtype": "float32", "outer_optimizer": "adam", "peak_definition": PEAK_DEFINITION,
                "seconds_definition": SECONDS_DEFINITION,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result: dict[str, Any] = {"settings": settings, "records": [], "targets": []}
    print(f"bench memory: {len(jobs)} configurations on {settings['device']} ({settings['device_name']}, "
          f"{settings['threads']} threads), each in a fresh process", file=progress, flush=True)
    t0 = time.perf_counter()
    for i, (algo, variant, k) in enumerate(jobs, 1):
        rec = run_in_subprocess(s, algo, variant, k)
        result["records"].append(rec)
        ks = "-" if k is None else str(k)
        if rec.get("error"):
            msg = f"FAILED: {rec['error']}"
        else:
            msg = f"peak {rec['peak_mb']:.2f} MB, {rec['seconds']:.4f} s/iter"
            if rec.get("cuda_peak_mb") is not None:
                msg += f" (cuda allocator {rec['cuda_peak_mb']:.2f} MB)"
        print(f"[{i}/{len(jobs)}] {algo}/{variant} K={ks}: {msg} ({rec.get('wall_s', 0):.1f} s)", file=progress, flush=True)
        if jp is not None:
            result["settings"]["total_wall_s"] = round(time.perf_counter() - t0, 1)
            atomic_json(jp, result)
    result["targets"] = targets(result["records"])
    result["settings"]["total_wall_s"] = round(time.perf_counter() - t0, 1)
    if jp is not None:
        atomic_json(jp, result)
    if pp is not None:
        plot(result, pp)
    print(table(result["records"]), file=stream)
    for line in target_lines(result["targets"]):
        print(line, file=stream)
    failed = sum(1 for r in result["records"] if r.get("error"))
    done = f"{len(jobs)} configurations in {result['settings']['total_wall_s']:.1f} s"
    if failed:
        done += f"; {failed} failed (recorded with `error`)"
    outs = [str(p) for p in (jp, pp) if p is not None]
    print(done + (f"; wrote {', '.join(outs)}" if outs else ""), file=stream)
    return result, (1 if failed else 0)


def add_commands(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """The `mrml bench memory` subcommand (plugin hook of `mrml.cli`)."""
    p = subparsers.add_parser("bench", help="measure peak memory and time per meta-iteration against K")
    bsub = p.add_subparsers(dest="bench_command", parser_class=type(p))
    m = bsub.add_parser(
        "memory", help="peak MB and seconds per meta-iteration for each algorithm, variant and K",
        description="Each (algorithm, variant, K) is measured in a fresh process: 1 warm-up meta-step, 1 meta-step "
                    "under the peak-memory meter, then --repeats timed meta-steps (median). Also measured: the "
                    "floor, one plain forward+backward of the network on the same images. Exit code 1 when a "
                    "configuration failed (it is recorded with `error`), 2 on bad input.")
    m.add_argument("--algos", default=DEFAULT_ALGOS, help=f"comma-separated algorithms (default {DEFAULT_ALGOS}); "
                   "the floor is always measured")
    m.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma-separated inner steps K (default {DEFAULT_STEPS})")
    m.add_argument("--variants", default=None, help="comma-separated: default, recompute (mrml, anil, itd-bio), "
                   "paper, last-block, last-block-newton, all, last-block-projected (mrml); default: every variant "
                   "that applies")
    m.add_argument("--skip", default=None, metavar="ALGO[/VARIANT]:K,...",
                   help="configurations not to measure, e.g. maml:100 (too slow on a small machine)")
    m.add_argument("--json", default=None, metavar="OUT.json", help="write settings, records and targets here")
    m.add_argument("--plot", default=None, metavar="OUT.png", help="plot peak MB and seconds against K")
    add_options(m, BenchSettings, show_defaults=True)  # the settings, as declared (defaults in BenchSettings)
    commands["bench"] = cmd_bench


def cmd_bench(ns: argparse.Namespace) -> int:
    if ns.bench_command != "memory":
        raise UsageError("expected `mrml bench memory [options]` (see `mrml bench memory --help`)")
    from .algorithms import ALGORITHMS

    algos = _csv(ns.algos, "algos")
    known = sorted(ALGORITHMS) + [FLOOR]
    for a in algos:
        if a not in known:
            raise UsageError(f"unknown algorithm {a!r} in --algos: expected some of {', '.join(known)}")
    variants = None
    if ns.variants is not None:
        variants = _csv(ns.variants, "variants")
        for v in variants:
            if v not in VARIANTS:
                raise UsageError(f"unknown variant {v!r} in --variants: expected some of {', '.join(VARIANTS)}")
    steps = parse_steps(ns.steps)
    skip = parse_skip(ns.skip, algos)
    s = BenchSettings(**{f.name: getattr(ns, f.name) for f in fields(BenchSettings) if getattr(ns, f.name) is not None})
    if s.dataset == SYNTHETIC and s.image_size is None:
        s.image_size = 32
    _, code = run_memory_bench(s, algos, variants, steps, ns.json, ns.plot, skip=skip)
    return code


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
