"""The engine on the devices users train on: per-task loop vs task-batched chunks, default vs gd form.

For each model (Conv-4-64 on CIFAR-FS-shaped 3 x 32 x 32 images; ResNet-12 at 3 x 84 x 84), each
estimator form (`default`: what `MRML(model)` resolves to, recorded as it resolved -- inner solver,
implicit system, learned lambda; `gd`: Algorithm 1 as written, K = 20 gradient steps + 20 CG steps at
a fixed lambda) and each task chunk (1 = the per-task loop), at meta-batch B, 5-way 5-shot, 15 query:
- seconds per meta-iteration (median of `--repeats` timed iterations after one warm-up, device synced
  around each; one Adam step each);
- peak allocator MiB of one meta-iteration (CUDA: `torch.cuda.max_memory_allocated` above the
  starting point; CPU: `mrml.memory.PeakMemoryMeter`, in its own iteration, outside the timing);
- host syncs of one `meta_gradient` call: `mrml.syncs.count_host_syncs` (tensor-to-Python
  conversions; the optimizer step is left out, its step counters live on the host) and, on CUDA, the warnings of `torch.cuda.set_sync_debug_mode("warn")` (every synchronising call);
- with `--amp bf16`, the chunked forms again under autocast (solves stay float32).
The episodes are random tensors (speed does not depend on the pixels), the same for every
configuration. A configuration that fails (e.g. out of memory) is recorded with its error.

    python benchmarks/engine.py [--device cuda] [--meta-batch 32] [--chunks 1,8,32] [--forms default,gd]
                                [--models conv4,resnet12] [--amp bf16] [--repeats 3] [--out DIR]

Writes DIR/engine_<device>.json and .csv (default benchmarks/results/engine), prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from mrml import harness
from mrml.algorithms import AlgoConfig, MRML
from mrml.data.base import Episode
from mrml.models import build_model
from mrml.syncs import count_host_syncs

ROOT = Path(__file__).resolve().parent
MODELS = {"conv4": ("conv4", (3, 32, 32), 64), "resnet12": ("resnet12", (3, 84, 84), None)}
FORMS = {"default": {}, "gd": {"inner_solver": "gd", "implicit": "cg", "learn_l2": False, "l2": 0.01,
                               "inner_steps": 20, "cg_steps": 20}}


def make_episodes(n: int, shape: tuple[int, ...], device: str, ways: int = 5, shots: int = 5,
                  query: int = 15) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    ys, yq = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(query)
    return [Episode(torch.randn(ways * shots, *shape, generator=g), ys, torch.randn(ways * query, *shape, generator=g),
                    yq).to(device) for _ in range(n)]


def cuda_sync_warnings(step: Any, batch: list) -> int | None:
    """Synchronising CUDA calls in one step, as `set_sync_debug_mode("warn")` reports them."""
    if not torch.cuda.is_available() or batch[0].support_y.device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batch)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(model_name: str, form: str, chunk: int, amp: str | None, eps: list[Episode], device: str,
            repeats: int) -> dict[str, Any]:
    backbone, shape, width = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(backbone, shape, 5, width).to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        algo = MRML(model, "classification", AlgoConfig(task_chunk=chunk, amp=amp, **FORMS[form]))
    cfg = algo.config
    record: dict[str, Any] = {"model": model_name, "form": form, "chunk": chunk, "amp": amp,
                              "inner_solver": cfg.inner_solver, "implicit": cfg.implicit, "learn_l2": cfg.learn_l2,
                              "construction_warnings": [str(w.message) for w in caught]}
    opt = torch.optim.Adam(algo.outer_parameters(), lr=1e-3)
    step = harness.meta_step(algo, opt)
    record["warm_up_s"] = harness.warm_up(step, eps, device)
    with count_host_syncs() as counter:  # meta_gradient only: Adam's step counters live on the host
        algo.meta_gradient(eps)
        harness.sync(device)
    opt.step()
    record["host_syncs"], record["host_syncs_by_kind"] = counter.total, dict(counter.by_kind)
    record["cuda_sync_warnings"] = cuda_sync_warnings(step, eps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step(eps)
        torch.cuda.synchronize()
        record["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        report, _ = harness.metered(step, eps, device)
        record["peak_mb"] = report.peak_mb
    times = [harness.timed(step, eps, device)[0] for _ in range(repeats)]
    record["seconds"] = statistics.median(times)
    record["seconds_all"] = times
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--chunks", default="1,8,32")
    p.add_argument("--forms", default="default,gd")
    p.add_argument("--models", default="conv4,resnet12")
    p.add_argument("--amp", default=None, help="also run the chunked forms under this autocast dtype (bf16, fp16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--out", default=str(ROOT / "results" / "engine"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    chunks = [int(c) for c in a.chunks.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, str, int, str | None]] = []
    for m in a.models.split(","):
        for form in a.forms.split(","):
            runs += [(m, form, c, None) for c in chunks]
            if a.amp:
                runs += [(m, form, c, a.amp) for c in chunks if c > 1]
    records: list[dict[str, Any]] = []
    episodes: dict[str, list[Episode]] = {}
    for m, form, c, amp in runs:
        if m not in episodes:
            episodes[m] = make_episodes(a.meta_batch, MODELS[m][1], a.device)
        t0 = time.perf_counter()
        try:
            rec = measure(m, form, c, amp, episodes[m], a.device, a.repeats)
        except Exception as e:  # recorded, not fatal: e.g. out of memory at chunk 32 on a small card
            rec = {"model": m, "form": form, "chunk": c, "amp": amp, "error": f"{type(e).__name__}: {str(e)[:300]}",
                   "traceback": traceback.format_exc()[-2000:]}
        rec["wall_s"] = time.perf_counter() - t0
        records.append(rec)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in rec.items() if k not in ("traceback", "seconds_all")}), flush=True)
    meta = {"device": a.device, "name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "meta_batch": a.meta_batch, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "episode": "5-way 5-shot, 15 query"}
    stem = out / f"engine_{a.device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    keys = ["model", "form", "chunk", "amp", "inner_solver", "implicit", "learn_l2", "seconds", "peak_mb",
            "host_syncs", "cuda_sync_warnings", "error"]
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    head = harness.columns([("model", -9), ("form", -8), ("chunk", 6), ("amp", 6), ("solver", 8), ("s/iter", 9),
                            ("peak MiB", 10), ("syncs", 7), ("cuda", 6)], " ")
    rows = [harness.columns([(r["model"], -9), (r["form"], -8), (r["chunk"], 6), (r.get("amp") or "-", 6),
                             (r.get("inner_solver", "-"), 8),
                             (f"{r['seconds']:.3f}" if "seconds" in r else "ERR", 9),
                             (f"{r['peak_mb']:.1f}" if "peak_mb" in r else "-", 10), (r.get("host_syncs", "-"), 7),
                             (r.get("cuda_sync_warnings") if r.get("cuda_sync_warnings") is not None else "-", 6)], " ")
            for r in records]
    print(harness.table(head, rows))
    print(f"wrote {stem}.json and {stem}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
