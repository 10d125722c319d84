"""Meta-training: build the run from its config, loop over meta-batches, validate, checkpoint, test.

Episode b of iteration t is drawn from `episode_rng(seed, "train", t * meta_batch + b)`, and its
augmentation (when on) from the counter position `(t * meta_batch + b) * ways`, so a resumed run (or
a distributed one) sees exactly the episodes of an uninterrupted single-process run.

Stopping: SIGINT and SIGTERM end the current step (or abandon a validation, which the resumed run
redoes first), write the checkpoint and exit 130/143 on every rank; a second Ctrl-C stops at once,
keeping the last checkpoint written. A non-finite loss, gradient or parameter stops the run
(NonFiniteError, exit 3) with the last finite checkpoint kept.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed, interrupts
from .algorithms import MetaAlgorithm, build_algorithm
from .algorithms.guards import all_finite
from .checkpoint import (RUN_FILES, append_bytes, atomic_json, atomic_write, load_checkpoint, remove_stale_temps,
                         save_checkpoint, strict_dumps)
from .config import RunConfig
from .devices import pick_device
from .data.base import episode_rng
from .data.registry import build_dataset
from .errors import Interrupted, NonFiniteError, UsageError
from .evaluate import episode_scores, meta_test, summarize
from .memory import PeakMemoryMeter
from .models import build_model
from .models.backbones import DEFAULT_WIDTH, check_backbone
from .prefetch import EpisodeFeed
from .runlock import RunLock

TENSORBOARD = "tensorboard"  # the folder of --tensorboard's event files, inside the run folder


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

    def episodes(self, iteration: int, indices: range | None = None, device: torch.device | None = None) -> list:
        """The training episodes `indices` (default: all) of meta-iteration `iteration`, on `device` (default:
        the run's), cast to the run's dtype. Training draws them through a `prefetch.EpisodeFeed`."""
        cfg = self.config
        idx = indices if indices is not None else range(cfg.meta_batch)
        out = []
        for b in idx:
            n = iteration * cfg.meta_batch + b
            seek_augmentation(self.source, n * cfg.ways)
            out.append(self.source.episode("train", cfg.ways, cfg.shots, cfg.query,
                                           episode_rng(cfg.seed, "train", n)).to(device or self.device, self.dtype))
        return out

    def validate(self, ctx: distributed.DistContext) -> dict[str, Any]:
        """Validation over `val_episodes` episodes, each rank scoring its share (the same numbers as one process)."""
        cfg = self.config
        mine = range(ctx.rank, cfg.val_episodes, ctx.world)
        losses, accs = episode_scores(self.algo, self.source, "validation", cfg.ways, cfg.shots, cfg.query,
                                      cfg.eval_seed, mine, self.device, self.dtype)
        losses, accs = distributed.gather_scores(ctx, cfg.val_episodes, mine, losses, accs, self.device)
        return summarize("validation", cfg.eval_seed, losses, accs)

    def test(self, split: str = "test", episodes: int | None = None, seed: int | None = None,
             progress: bool = False) -> dict[str, Any]:
        cfg = self.config
        return meta_test(self.algo, self.source, split, cfg.ways, cfg.shots, cfg.query,
                         episodes or cfg.test_episodes, cfg.eval_seed if seed is None else seed,
                         self.device, self.dtype, progress)


def model_spec(cfg: RunConfig, source: Any) -> dict[str, Any]:
    """What `build_model` needs to rebuild the run's network (saved in its checkpoints as `model_spec`)."""
    backbone = cfg.backbone  # what config.json says is what runs (RunConfig picks mlp for sinusoid by default)
    check_backbone(backbone, tuple(source.input_shape))
    return {"backbone": backbone, "width": cfg.width or DEFAULT_WIDTH.get(backbone), "kind": source.kind,
            "input_shape": [int(v) for v in source.input_shape], "outputs": int(source.num_outputs(cfg.ways))}


def build_run(cfg: RunConfig, local_rank: int = 0, source: Any = None) -> Run:
    """The run `cfg` describes; `source` (given) stands in for its dataset, which is then not read or checked."""
    device = pick_device(cfg.device, local_rank)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    if source is None:
        source = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options())
        for split in ("train", "validation", "test"):
            source.check_episode(split, cfg.ways, cfg.shots, cfg.query)
    torch.manual_seed(cfg.seed)
    spec = model_spec(cfg, source)
    backbone = spec["backbone"]
    try:
        model = build_model(backbone, tuple(spec["input_shape"]), spec["outputs"], cfg.width).to(device, dtype)
    except RuntimeError as e:
        raise UsageError(f"backbone {backbone!r} cannot take inputs of shape {tuple(source.input_shape)} "
                         f"({str(e).splitlines()[0]}): pick a larger --image-size or another --backbone") from None
    algo = build_algorithm(cfg.algo, model, source.kind, cfg.algo_config())
    params = algo.outer_parameters()
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.outer_lr)
    else:
        opt = torch.optim.SGD(params, lr=cfg.outer_lr)
    return Run(cfg, source, model, algo, opt, device, dtype)


def seek_augmentation(source: Any, position: int) -> None:
    """Set the training augmentation's counter (calls so far) to `position`, where the source has one."""
    splits = getattr(source, "splits", None)
    pre = getattr(splits.get("train"), "preprocess", None) if isinstance(splits, dict) else None
    if pre is not None and getattr(pre, "augment", False):
        pre.calls = position


def default_out(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.dataset}-{cfg.algo}-{cfg.ways}w{cfg.shots}s-{stamp}"


def prepare_out(out: Path, resume: bool) -> RunLock:
    """Create and lock the run folder; a new run refuses a folder holding any run file (a run killed before its
    first checkpoint included) or a link where one goes; fail early if it is not writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)  # exclusive, never through a link
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable folder") from None
    lock = RunLock(out).acquire()
    held = [name for name in (*RUN_FILES, "metrics.jsonl.corrupt", TENSORBOARD) if os.path.lexists(out / name)]
    if not resume and held:
        lock.release()
        found = ", ".join(held)
        if "checkpoint.pt" in held:
            raise UsageError(f"{out} already holds a run ({found}): continue it with `mrml train --resume {out}` "
                             "or pick another --out")
        raise UsageError(f"{out} already holds files a run writes ({found}; no checkpoint to --resume from): "
                         "pick another --out, or move them away to start afresh there")
    for name in RUN_FILES:
        remove_stale_temps(out, name)
    return lock


class MetricsLog:
    """metrics.jsonl (the source of truth; strict JSON, non-finite numbers as null), mirrored to TensorBoard if asked."""

    def __init__(self, path: Path, tensorboard: bool):
        self.path = path
        self.writer = None
        if tensorboard:
            logs = path.parent / TENSORBOARD
            if logs.is_symlink() or (logs.exists() and not logs.is_dir()):
                raise UsageError(f"{logs} is a link or not a folder: mrml writes TensorBoard logs only into a real "
                                 "folder of the run; remove it, then continue")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(logs))

    def __call__(self, record: dict[str, Any]) -> None:
        append_bytes(self.path, (strict_dumps(record) + "\n").encode())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "split"):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["iteration"])
            self.writer.flush()


def train(cfg: RunConfig | None = None, resume: str | Path | None = None, iterations: int | None = None,
          progress: bool = True, stream: Any = None) -> dict[str, Any]:
    """Train (or resume) a run and meta-test it; returns final.json's content.

    Raises UsageError (bad settings, a tampered checkpoint, a locked or full --out), NonFiniteError
    (training diverged) and Interrupted (SIGINT/SIGTERM, after checkpointing).
    """
    stream = stream or sys.stdout
    ctx = distributed.from_environment()
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        cfg = saved_config(state, resume)
        cfg.out = str(resume)
        if iterations is not None:
            cfg.iterations = iterations
        cfg.validate()
        if cfg.iterations < state["iteration"]:
            raise UsageError(f"--iterations {cfg.iterations} is below the {state['iteration']} iterations {resume} "
                             f"has done: give at least {state['iteration']}")
    elif cfg is not None:
        cfg.validate()
    assert cfg is not None
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    lock = prepare_out(out, resume is not None) if ctx.is_main else None
    try:
        if cfg.meta_batch < ctx.world:
            raise UsageError(f"--meta-batch {cfg.meta_batch} is smaller than the {ctx.world} processes: each needs a task")
        run = build_run(cfg, ctx.local_rank)
        distributed.init(ctx, run.device, cfg.dist_timeout)
        try:
            with interrupts.deferred():
                return _train_loop(run, ctx, out, state, progress, stream)
        except distributed.RankFailure as e:
            raise SystemExit(f"error: {e}; stopping") from None
        except (NonFiniteError, Interrupted) as e:
            if ctx.is_main:
                raise
            raise SystemExit(3 if isinstance(e, NonFiniteError) else 128 + e.signum) from None  # rank 0 reports
        finally:
            distributed.shutdown(ctx)
    finally:
        if lock is not None:
            lock.release()


def saved_config(state: dict[str, Any], run_dir: str | Path) -> RunConfig:
    """The RunConfig a checkpoint was written with; a config that does not fit is one line."""
    try:
        return RunConfig.from_dict(state["config"])
    except TypeError as e:
        raise UsageError(f"{Path(run_dir) / 'checkpoint.pt'} is damaged: its config does not fit ({e})") from None


def restore(run: Run, state: dict[str, Any], out: Path, optimizer: bool = True) -> None:
    """Load model, optimizer (unless `optimizer=False`) and algorithm state; a misfit is one line."""
    try:
        run.model.load_state_dict(state["model"])
        if optimizer:
            run.optimizer.load_state_dict(state["optimizer"])
        run.algo.load_state_dict(state.get("algo") or {})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{out / 'checkpoint.pt'} does not fit the model its config builds "
                         f"({' '.join(str(e).split())[:160]}): is it damaged?") from None
    for key in ("best_validation", "plain_timing", "data_wait"):
        if key in state and state[key] is not None and not isinstance(state[key], (dict, list, tuple)):
            raise UsageError(f"{out / 'checkpoint.pt'} is damaged: {key!r} is a {type(state[key]).__name__}")


def likely_cause(cfg: RunConfig, what: str, solver: str | None = "gd") -> str:
    """The setting that most likely made `what` (loss, parameters, validation, test) non-finite, given the
    inner solver the algorithm resolved (`gd` takes steps of --inner-lr / --test-lr; exact solvers do not)."""
    exact = solver not in (None, "gd")
    if what in ("validation", "test"):
        if exact:
            return f"the {solver} inner solve diverged: check --l2 and --inner-tol"
        return f"--test-lr {cfg.test_lr:g} (with --test-steps {cfg.test_steps}) is likely too large"
    if what == "parameters" or cfg.outer_lr > 1:
        return f"--outer-lr {cfg.outer_lr:g} is likely too large"
    if cfg.l2 is not None and cfg.l2 > 1e4:
        return f"--l2 {cfg.l2:g} is likely too large"
    if exact:
        return f"the {solver} inner solve diverged: check --l2 and --inner-tol, or lower --outer-lr {cfg.outer_lr:g}"
    return f"--inner-lr {cfg.inner_lr:g} is likely too large" + (
        " for --plain-inner (without it a guard damps divergent inner steps)" if cfg.plain_inner else "")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """`guards.all_finite`, read on the host (True for no tensors)."""
    flag = all_finite(tensors)
    return True if flag is None else bool(flag)


def _train_loop(run: Run, ctx: distributed.DistContext, out: Path, state: dict[str, Any] | None, progress: bool,
                stream: Any) -> dict[str, Any]:
    cfg = run.config
    done, elapsed, best, owed = 0, 0.0, None, False  # owed: the validation of iteration `done` is still to run
    plain = [0.0, 0]  # seconds and count of the iterations run outside the memory meter (the timing figure)
    data_wait = [0.0, 0]  # seconds the loop waited for its episodes, over how many iterations (final.json)
    if state is not None:
        restore(run, state, out)
        done, elapsed, best = state["iteration"], float(state["seconds"]), state.get("best_validation")
        plain = list(state.get("plain_timing", plain))
        data_wait = list(state.get("data_wait", data_wait))
        owed = bool(state.get("validation_owed", False))
        if ctx.is_main:
            _truncate_metrics(out / "metrics.jsonl", done, stream)
            (out / "final.json").unlink(missing_ok=True)  # from an earlier end; rewritten when this run ends
    elif ctx.is_main:
        for name in ("metrics.jsonl", "final.json"):
            (out / name).unlink(missing_ok=True)
    if ctx.is_main:  # the settings as the algorithm resolved them (solver, implicit system, lambda, prox, inner part)
        atomic_json(out / "config.json", replace(cfg, algo_settings=run.algo.config).to_dict())
    if cfg.preset and state is None and ctx.is_main:
        print(f"preset {cfg.preset} for {cfg.algo}: " + json.dumps(cfg.to_dict()), file=stream)

    spec = model_spec(cfg, run.source)

    def checkpoint(validation_owed: bool = False) -> None:
        if not ctx.is_main:
            return
        save_checkpoint(out / "checkpoint.pt", {
            "config": cfg.to_dict(), "iteration": done, "seconds": elapsed, "best_validation": best,
            "plain_timing": plain, "validation_owed": validation_owed, "data_wait": data_wait,
            "augment_calls": done * cfg.meta_batch * cfg.ways,  # where the augmentation counter resumes
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "algo": run.algo.state_dict(),
            "model_spec": spec,  # what rebuilds the network without its dataset (mrml.load_run, mrml export)
        })

    metrics = out / "metrics.jsonl"
    log = MetricsLog(metrics, cfg.tensorboard and ctx.is_main)
    params = run.algo.outer_parameters()
    solver = run.algo.config.inner_solver  # as the algorithm resolved it

    def cause(what: str) -> str:
        return likely_cause(cfg, what, solver)

    def stop(signum: int, message: str) -> None:
        checkpoint(validation_owed=owed)
        if ctx.is_main:
            print(f"{message}: checkpoint at iteration {done} in {out}; continue with `mrml train --resume {out}`",
                  file=stream)
        e = Interrupted(signum)
        e.reported = True  # type: ignore[attr-defined]
        raise e

    def validate() -> None:
        """Validate at iteration `done`; in one process a signal abandons it (the checkpoint owes it)."""
        nonlocal best, owed
        owed = True
        with interrupts.interruptible(not ctx.active):
            val = run.validate(ctx)
        if not math.isfinite(val["loss"]):
            raise NonFiniteError(f"validation loss at iteration {done} is not finite: {cause('validation')}")
        if ctx.is_main:
            log({"split": "validation", "iteration": done, "loss": val["loss"],
                 "accuracy": val["accuracy"], "ci95": val["ci95"], "seconds": round(elapsed, 4)})
        key = "accuracy" if val["accuracy"] is not None else "loss"
        if best is None or (val[key] > best[key] if key == "accuracy" else val[key] < best[key]):
            best = {"iteration": done, "accuracy": val["accuracy"], "loss": val["loss"]}
        owed = False

    bar = None
    if progress and cfg.iterations > done and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=done, desc=f"{cfg.algo} {cfg.dataset}", dynamic_ncols=True)
    feed = EpisodeFeed(run, done, cfg.iterations, ctx.shard(cfg.meta_batch), cfg.prefetch)
    try:
        if owed:
            validate()
        while done < cfg.iterations:
            it = done
            t0 = time.perf_counter()
            shard = ctx.shard(cfg.meta_batch)
            waited = feed.waited
            eps = feed(it)
            data_wait[0], data_wait[1] = data_wait[0] + feed.waited - waited, data_wait[1] + 1
            logged = (it + 1) % cfg.log_every == 0 or it == 0  # not on resuming: the log matches an unbroken run
            meter = PeakMemoryMeter(run.device) if logged else None
            with meter if meter is not None else contextlib.nullcontext():
                stats = run.algo.meta_gradient(eps, scale=1.0 / cfg.meta_batch, check_finite=False)  # checked below
                stats = distributed.all_reduce_step(ctx, params, stats, len(shard), run.device)
                finite = math.isfinite(stats.loss) and _all_finite([p.grad for p in params if p.grad is not None])
                if finite:
                    run.optimizer.step()
            if not finite:
                checkpoint()  # the parameters of `done` steps, all finite
                raise NonFiniteError(f"non-finite training loss or gradient at iteration {it + 1}: "
                                     f"{cause('loss')}; the checkpoint keeps iteration {done}")
            if not _all_finite([p.detach() for p in params]):
                raise NonFiniteError(f"non-finite parameters after iteration {it + 1}: {cause('parameters')}; "
                                     f"the last checkpoint in {out} is kept")
            done = it + 1
            dt = time.perf_counter() - t0
            elapsed += dt
            if meter is None:
                plain[0], plain[1] = plain[0] + dt, plain[1] + 1
            if meter is not None and ctx.is_main:
                rep = meter.report()
                rec = {"split": "train", "iteration": done, "loss": stats.loss, "accuracy": stats.accuracy,
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
            if done % cfg.val_every == 0 or done == cfg.iterations:
                validate()
            saved = done % cfg.checkpoint_every == 0
            if saved:
                checkpoint()
            signum = distributed.agree_stop(ctx, interrupts.pending(), run.device)
            if signum is not None and done < cfg.iterations:
                if bar is not None:
                    bar.close()
                stop(signum, "interrupted")
    except Interrupted as e:
        if bar is not None:
            bar.close()
        if e.forced and ctx.is_main:
            print(f"interrupted twice: stopped at once, the last checkpoint in {out} is kept; "
                  f"continue with `mrml train --resume {out}`", file=stream)
            e.reported = True  # type: ignore[attr-defined]
        if getattr(e, "reported", False) or e.forced:
            raise
        stop(e.signum, "interrupted during validation")
    finally:
        feed.close()  # the episode thread never outlives the loop
    if bar is not None:
        bar.close()
    checkpoint()
    if not ctx.is_main:
        return {}
    try:
        with interrupts.interruptible():
            test = run.test("test", progress=progress)
    except Interrupted as e:
        print(f"interrupted during the final meta-test: the trained model (iteration {done}) is saved in {out}; "
              f"`mrml train --resume {out}` runs the meta-test", file=stream)
        e.reported = True  # type: ignore[attr-defined]
        raise
    # seconds_per_iteration: mean over the iterations run outside the memory meter (a metered step costs
    # 1.5-1.85x a plain one); every iteration when none ran unmetered (e.g. --log-every 1)
    per_it = plain[0] / plain[1] if plain[1] else elapsed / max(cfg.iterations, 1)
    final = {"algo": cfg.algo, "dataset": cfg.dataset, "iterations": cfg.iterations, "seconds": round(elapsed, 3),
             "seconds_per_iteration": round(per_it, 5), "timed_iterations": plain[1] or cfg.iterations,
             "best_validation": best,
             "data_wait_s": round(data_wait[0] / data_wait[1], 6) if data_wait[1] else None,
             "peak_mb": _max_peak(metrics), "device": str(run.device), **{k: test[k] for k in
             ("accuracy", "ci95", "loss", "loss_ci95", "episodes", "seed")}}
    atomic_json(out / "final.json", final)
    if not math.isfinite(final["loss"]):
        raise NonFiniteError(f"meta-test loss is not finite: {cause('test')} (final.json records it as null)")
    if final["accuracy"] is not None:
        print(f"meta-test accuracy: {100 * final['accuracy']:.2f}% ± {100 * (final['ci95'] or 0):.2f}% "
              f"({final['episodes']} episodes, {cfg.ways}-way {cfg.shots}-shot, {cfg.dataset}); results in {out}", file=stream)
    else:
        print(f"meta-test loss: {final['loss']:.4f} ± {final['loss_ci95'] or 0:.4f} ({final['episodes']} episodes, "
              f"{cfg.dataset}); results in {out}", file=stream)
    return final


def _read_records(path: Path) -> tuple[list[bytes], list[bytes]]:
    """metrics.jsonl's lines split into good records and lines that are cut off or undecodable."""
    good, bad = [], []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            ok = isinstance(rec, dict) and isinstance(rec.get("iteration"), int)
        except (UnicodeDecodeError, ValueError):
            ok = False
        (good if ok else bad).append(line)
    return good, bad


def _truncate_metrics(path: Path, iteration: int, stream: Any = None) -> None:
    """Drop records logged after the checkpoint a resumed run starts from (they will be redone); lines that
    are cut off (a full disk, a kill mid-append) or undecodable go to metrics.jsonl.corrupt, reported in one line."""
    if path.is_symlink():  # its lines would be read from, and set aside out of, a file outside the run
        raise UsageError(f"{path} is a symbolic link: mrml neither reads nor writes run files through links; "
                         "put the file itself there (or remove it), then continue")
    if not path.exists():
        return
    good, bad = _read_records(path)
    if bad:
        corrupt = path.with_name(path.name + ".corrupt")
        append_bytes(corrupt, b"".join(line + b"\n" for line in bad))
        print(f"warning: set aside {len(bad)} unreadable line(s) of {path} in {corrupt}", file=stream or sys.stderr)
    keep = [line for line in good if json.loads(line)["iteration"] <= iteration]
    atomic_write(path, lambda f: f.write(b"".join(line + b"\n" for line in keep)))


def _max_peak(metrics: Path) -> float | None:
    if not metrics.exists():
        return None
    peaks = [r["peak_mb"] for r in map(json.loads, _read_records(metrics)[0])
             if isinstance(r.get("peak_mb"), (int, float))]
    return max(peaks) if peaks else None
