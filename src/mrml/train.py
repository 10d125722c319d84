"""Meta-training: build the run from its config, loop over meta-batches, validate, checkpoint, test.

Episode b of iteration t is drawn from `episode_rng(seed, "train", t * meta_batch + b)`, so a resumed
run (or a distributed one) sees exactly the episodes of an uninterrupted single-process run.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .algorithms import MetaAlgorithm, build_algorithm
from .checkpoint import atomic_json, atomic_write, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data.base import episode_rng
from .data.registry import build_dataset
from .errors import UsageError
from .evaluate import meta_test
from .memory import PeakMemoryMeter
from .models import build_model


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here: use --device cpu")
    return dev


@dataclass
class Run:
    """Everything a run is made of, built from its config."""

    config: RunConfig
    source: Any
    model: torch.nn.Module
    algo: MetaAlgorithm
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype

    def episodes(self, iteration: int, indices: range | None = None) -> list:
        cfg = self.config
        idx = indices if indices is not None else range(cfg.meta_batch)
        return [
            self.source.episode("train", cfg.ways, cfg.shots, cfg.query,
                                episode_rng(cfg.seed, "train", iteration * cfg.meta_batch + b)).to(self.device, self.dtype)
            for b in idx
        ]

    def test(self, split: str = "test", episodes: int | None = None, seed: int | None = None,
             progress: bool = False) -> dict[str, Any]:
        cfg = self.config
        return meta_test(self.algo, self.source, split, cfg.ways, cfg.shots, cfg.query,
                         episodes or cfg.test_episodes, cfg.eval_seed if seed is None else seed,
                         self.device, self.dtype, progress)


def build_run(cfg: RunConfig, local_rank: int = 0) -> Run:
    device = pick_device(cfg.device, local_rank)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    source = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options())
    for split in ("train", "validation", "test"):
        source.check_episode(split, cfg.ways, cfg.shots, cfg.query)
    torch.manual_seed(cfg.seed)
    backbone = cfg.backbone if source.kind == "classification" or cfg.backbone != "conv4" else "mlp"
    model = build_model(backbone, source.input_shape, source.num_outputs(cfg.ways), cfg.width).to(device, dtype)
    algo = build_algorithm(cfg.algo, model, source.kind, cfg.algo_config())
    params = algo.outer_parameters()
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.outer_lr)
    else:
        opt = torch.optim.SGD(params, lr=cfg.outer_lr)
    return Run(cfg, source, model, algo, opt, device, dtype)


def default_out(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.dataset}-{cfg.algo}-{cfg.ways}w{cfg.shots}s-{stamp}"


def prepare_out(out: Path, resume: bool) -> None:
    """Create the run folder; refuse to overwrite another run; fail early if it is not writable."""
    if not resume and (out / "checkpoint.pt").exists():
        raise UsageError(f"{out} already holds a run: continue it with `mrml train --resume {out}` or pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable folder") from None


class MetricsLog:
    """metrics.jsonl (the source of truth), mirrored to TensorBoard when asked for."""

    def __init__(self, path: Path, tensorboard: bool):
        self.path = path
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def __call__(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "split"):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["iteration"])
            self.writer.flush()


def train(cfg: RunConfig | None = None, resume: str | Path | None = None, iterations: int | None = None,
          progress: bool = True, stream: Any = None) -> dict[str, Any]:
    """Train (or resume) a run and meta-test it; returns final.json's content."""
    stream = stream or sys.stdout
    ctx = distributed.from_environment()
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        cfg = RunConfig.from_dict(state["config"])
        cfg.out = str(resume)
        if iterations is not None:
            cfg.iterations = iterations
    assert cfg is not None
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    if ctx.is_main:
        prepare_out(out, resume is not None)
    if cfg.meta_batch < ctx.world:
        raise UsageError(f"--meta-batch {cfg.meta_batch} is smaller than the {ctx.world} processes: each needs a task")
    run = build_run(cfg, ctx.local_rank)
    distributed.init(ctx, run.device, cfg.dist_timeout)
    try:
        return _train_loop(run, ctx, out, state, progress, stream)
    except distributed.RankFailure as e:
        raise SystemExit(f"error: {e}; stopping") from None
    finally:
        distributed.shutdown(ctx)


def _train_loop(run: Run, ctx: distributed.DistContext, out: Path, state: dict[str, Any] | None, progress: bool,
                stream: Any) -> dict[str, Any]:
    cfg = run.config
    start, elapsed, best = 0, 0.0, None
    plain = [0.0, 0]  # seconds and count of the iterations run outside the memory meter (the timing figure)
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.algo.load_state_dict(state.get("algo", {}))
        start, elapsed, best = state["iteration"], state["seconds"], state.get("best_validation")
        plain = list(state.get("plain_timing", plain))
        if ctx.is_main:
            _truncate_metrics(out / "metrics.jsonl", start)
    elif ctx.is_main:
        for name in ("metrics.jsonl", "final.json"):
            (out / name).unlink(missing_ok=True)
    if ctx.is_main:
        atomic_json(out / "config.json", cfg.to_dict())
    if cfg.preset and state is None and ctx.is_main:
        print(f"preset {cfg.preset} for {cfg.algo}: " + json.dumps(cfg.to_dict()), file=stream)

    def checkpoint(iteration: int) -> None:
        if not ctx.is_main:
            return
        save_checkpoint(out / "checkpoint.pt", {
            "config": cfg.to_dict(), "iteration": iteration, "seconds": elapsed, "best_validation": best,
            "plain_timing": plain,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "algo": run.algo.state_dict(),
        })

    bar = None
    if progress and cfg.iterations > start and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc=f"{cfg.algo} {cfg.dataset}", dynamic_ncols=True)
    metrics = out / "metrics.jsonl"
    log = MetricsLog(metrics, cfg.tensorboard and ctx.is_main)
    it = start
    try:
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            shard = ctx.shard(cfg.meta_batch)
            eps = run.episodes(it, shard)
            logged = (it + 1) % cfg.log_every == 0 or it == start
            meter = PeakMemoryMeter(run.device) if logged else None
            with meter if meter is not None else contextlib.nullcontext():
                stats = run.algo.meta_gradient(eps, scale=1.0 / cfg.meta_batch)
                stats = distributed.all_reduce_step(ctx, run.algo.outer_parameters(), stats, len(shard), run.device)
                run.optimizer.step()
            dt = time.perf_counter() - t0
            elapsed += dt
            if meter is None:
                plain[0], plain[1] = plain[0] + dt, plain[1] + 1
            if meter is not None and ctx.is_main:
                rep = meter.report()
                rec = {"split": "train", "iteration": it + 1, "loss": stats.loss, "accuracy": stats.accuracy,
                       "seconds": round(elapsed, 4), "peak_mb": round(rep.peak_mb, 3), "meter": "dispatch",
                       **{k: v for k, v in stats.extra.items()}}
                if rep.cuda_peak_mb is not None:
                    rec["cuda_peak_mb"] = round(rep.cuda_peak_mb, 3)
                log(rec)
            if bar is not None:
                post = {"loss": f"{stats.loss:.3f}"}
                if stats.accuracy is not None:
                    post["acc"] = f"{stats.accuracy:.3f}"
                if best is not None:
                    post["val"] = f"{best['accuracy']:.3f}" if best.get("accuracy") is not None else f"{best['loss']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if ctx.is_main and ((it + 1) % cfg.val_every == 0 or it + 1 == cfg.iterations):
                val = run.test("validation", cfg.val_episodes)
                log({"split": "validation", "iteration": it + 1, "loss": val["loss"],
                               "accuracy": val["accuracy"], "ci95": val["ci95"], "seconds": round(elapsed, 4)})
                key = "accuracy" if val["accuracy"] is not None else "loss"
                better = best is None or (val[key] > best[key] if key == "accuracy" else val[key] < best[key])
                if better:
                    best = {"iteration": it + 1, "accuracy": val["accuracy"], "loss": val["loss"]}
            if (it + 1) % cfg.checkpoint_every == 0:
                checkpoint(it + 1)
        it = cfg.iterations
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        checkpoint(it)
        print(f"interrupted: checkpoint at iteration {it} in {out}; continue with `mrml train --resume {out}`", file=stream)
        raise SystemExit(130) from None
    if bar is not None:
        bar.close()
    checkpoint(cfg.iterations)
    if not ctx.is_main:
        return {}
    test = run.test("test", progress=progress)
    # seconds_per_iteration: mean over the iterations run outside the memory meter (a metered step costs
    # 1.5-1.85x a plain one); every iteration when none ran unmetered (e.g. --log-every 1)
    per_it = plain[0] / plain[1] if plain[1] else elapsed / max(cfg.iterations, 1)
    final = {"algo": cfg.algo, "dataset": cfg.dataset, "iterations": cfg.iterations, "seconds": round(elapsed, 3),
             "seconds_per_iteration": round(per_it, 5), "timed_iterations": plain[1] or cfg.iterations,
             "best_validation": best,
             "peak_mb": _max_peak(metrics), "device": str(run.device), **{k: test[k] for k in
             ("accuracy", "ci95", "loss", "loss_ci95", "episodes", "seed")}}
    atomic_json(out / "final.json", final)
    if final["accuracy"] is not None:
        print(f"meta-test accuracy: {100 * final['accuracy']:.2f}% ± {100 * final['ci95']:.2f}% "
              f"({final['episodes']} episodes, {cfg.ways}-way {cfg.shots}-shot, {cfg.dataset}); results in {out}", file=stream)
    else:
        print(f"meta-test loss: {final['loss']:.4f} ± {final['loss_ci95']:.4f} ({final['episodes']} episodes, "
              f"{cfg.dataset}); results in {out}", file=stream)
    return final


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop records logged after the checkpoint a resumed run starts from (they will be redone)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))


def _max_peak(metrics: Path) -> float | None:
    if not metrics.exists():
        return None
    peaks = [r["peak_mb"] for r in map(json.loads, metrics.read_text().splitlines()) if "peak_mb" in r]
    return max(peaks) if peaks else None
