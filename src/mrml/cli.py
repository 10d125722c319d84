"""Command-line front end: parses options and calls the library. No maths here.

Every user error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import Interrupted, NonFiniteError, UsageError

# option name -> (type, help); defaults live in RunConfig, so only given options are passed on
TRAIN_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "dataset": (str, "task source: glyphs (default, embedded), sinusoid, cifar-fs, fc100, mini-imagenet, tiered-imagenet, omniglot"),
    "data_root": (str, "folder holding the dataset files (on-disk benchmarks)"),
    "split_file": (str, "class split JSON to use instead of the canonical one"),
    "image_size": (int, "resize images to this side length (on-disk benchmarks)"),
    "algo": (str, "algorithm: mrml (default) and the baselines (see `mrml train --help`)"),
    "ways": (int, "classes per episode (N)"),
    "shots": (int, "support examples per class (K-shot)"),
    "query": (int, "query examples per class"),
    "meta_batch": (int, "tasks per outer iteration"),
    "iterations": (int, "outer iterations (0: untrained reference)"),
    "inner_steps": (int, "inner gradient steps K"),
    "inner_lr": (float, "inner step size alpha"),
    "outer_lr": (float, "outer (Adam) learning rate"),
    "cg_steps": (int, "conjugate-gradient iterations N"),
    "cg_tol": (float, "relative CG residual at which the solve stops early"),
    "l2": (float, "lambda: ridge (head) or proximal strength of the inner loss"),
    "inner": (str, "inner part: head, last-block, all, or parameter name prefixes"),
    "backbone": (str, "conv4 (default), resnet12, or mlp (sinusoid)"),
    "width": (int, "backbone width (filters); default per backbone"),
    "seed": (int, "seed of the model init and the training episodes"),
    "eval_seed": (int, "seed of the validation/test episodes"),
    "out": (str, "run folder (config.json, metrics.jsonl, checkpoint.pt, final.json)"),
    "device": (str, "auto (default), cpu, cuda, cuda:N"),
    "dtype": (str, "float32 (default) or float64"),
    "task_chunk": (int, "tasks per batched (vmap) pass of mrml; 1 (default): one at a time (best on CPU)"),
    "amp": (str, "mixed precision for the backbone: bf16 or fp16 (CUDA; CG stays float32)"),
    "threads": (int, "CPU threads for torch (default: one per core; 1 is faster when other jobs share the cores)"),
    "preset": (str, "the authors' settings: cifar-fs, fc100, mini-imagenet, tiered-imagenet; paper: mrml in the "
                    "paper's form (gd inner steps, CG) on any dataset"),
    "optimizer": (str, "outer optimizer: adam (default) or sgd"),
    "test_steps": (int, "head adaptation steps at test time"),
    "test_lr": (float, "head adaptation step size at test time"),
    "log_every": (int, "iterations between metrics.jsonl records"),
    "val_every": (int, "iterations between validations"),
    "val_episodes": (int, "episodes per validation"),
    "test_episodes": (int, "episodes of the final meta-test"),
    "checkpoint_every": (int, "iterations between checkpoints"),
    "dist_timeout": (float, "seconds a distributed process waits for the others before failing (torchrun runs)"),
    "inner_solver": (str, "inner solver: newton (mrml's default: solved to --inner-tol, --inner-steps the cap) or gd "
                          "(K gradient steps: Algorithm 1 as written)"),
    "inner_tol": (float, "exact inner solve stops at ||d_y g|| <= tol * max(1, ||d_y g(y_0)||)"),
    "implicit": (str, "implicit system: direct (linear head) | cg | damped | neumann (see README)"),
}
TRAIN_FLAGS = {
    "warm_start": "keep each task's inner solution and CG vector across iterations (fixed task sets)",
    "recompute_features": "paper-faithful form: re-run the backbone with gradient in every inner step",
    "first_order": "drop second-order terms where the algorithm has them",
    "plain_inner": "plain inner gradient descent: no divergence guard (the paper's loop; no per-step GPU sync)",
    "augment": "training-set augmentation (image datasets that offer it)",
    "compile": "torch.compile the backbone (falls back to eager with a warning where it cannot)",
    "tensorboard": "also log to TensorBoard in OUT/tensorboard (needs the tensorboard package)",
    "rotations": "add 90/180/270-degree rotations of each class as new classes (image datasets)",
    "learn_l2": "learn lambda (log-parametrised) as an outer variable, starting from --l2 (mrml's default "
                "with the exact solver; --no-learn-l2 keeps it fixed)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    for name, (typ, help_) in TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    for name, help_ in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_)
    p.add_argument("--prox", dest="prox", action="store_true", default=None, help="proximal inner loss (learned centre)")
    p.add_argument("--no-prox", dest="prox", action="store_false", help="ridge inner loss (centre 0)")
    p.add_argument("--no-learn-l2", dest="learn_l2", action="store_false",
                   help="keep lambda fixed at --l2 (mrml learns it by default with its exact solver)")


def explicit_options(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in names if getattr(ns, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrml", description="Memory-reduced meta-learning and its baselines.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("train", help="meta-train (default: glyphs 5-way 1-shot with mrml)")
    _add_train_options(p)
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="meta-test the checkpoint of a run folder (on its dataset or another)")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=None, help="episode seed (default: the run's eval seed)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--dataset", default=None, help="test on this dataset instead of the run's (images resized and "
                                                   "converted to the run's input shape)")
    p.add_argument("--data-root", default=None, help="dataset folder (of --dataset, or the run's if it moved)")
    p.add_argument("--split-file", default=None, help="class split JSON of the dataset (on-disk benchmarks)")
    p.add_argument("--ways", type=int, default=None, help="classes per episode (default: the run's)")
    p.add_argument("--shots", type=int, default=None, help="support examples per class (default: the run's)")
    p.add_argument("--query", type=int, default=None, help="query examples per class (default: the run's)")
    p.add_argument("--device", default=None)
    p.add_argument("--test-steps", type=int, default=None, help="test-time adaptation steps (default: the run's)")
    p.add_argument("--test-lr", type=float, default=None, help="test-time adaptation step size (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("data", help="inspect datasets on disk")
    dsub = p.add_subparsers(dest="data_command", parser_class=_Parser)
    c = dsub.add_parser("check", help="detect the format, verify splits, shapes and counts")
    c.add_argument("--dataset", required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--split-file", default=None)
    for module in PLUGIN_COMMANDS:
        importlib.import_module(module).add_commands(sub, COMMANDS)
    return parser


def cmd_train(ns: argparse.Namespace) -> int:
    from .config import RunConfig
    from .train import train

    opts = explicit_options(ns, list(TRAIN_OPTIONS) + list(TRAIN_FLAGS) + ["prox"])
    if ns.resume is not None:
        extra = set(opts) - {"iterations"}
        if extra:
            raise UsageError(f"--resume continues a run with its saved settings; only --iterations may change (got --{sorted(extra)[0].replace('_', '-')})")
        train(resume=ns.resume, iterations=opts.get("iterations"), progress=not ns.no_progress)
    else:
        train(RunConfig.resolve(opts), progress=not ns.no_progress)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .checkpoint import strict_dumps
    from .runs import eval_dataset, load_run
    from .train import likely_cause
    from .validation import EVAL_RANGES, check_all

    check_all(ns, EVAL_RANGES)
    if ns.data_root and not Path(ns.data_root).is_dir():
        raise UsageError(f"--data-root {ns.data_root} is not a folder: pass the folder that holds the dataset")
    run = load_run(ns.run_dir, device=ns.device, test_steps=ns.test_steps, test_lr=ns.test_lr,
                   data_root=ns.data_root if ns.dataset is None else None)  # the run's own data, moved
    cfg = run.config
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    dataset = eval_dataset(run, ns.dataset, ns.data_root, ns.split_file)
    name = ns.dataset or cfg.dataset
    result = run.evaluate(dataset, ns.split, ns.episodes, ns.ways, ns.shots, ns.query,
                          cfg.eval_seed if ns.seed is None else ns.seed, progress=not ns.json)
    result.update(run_dir=str(ns.run_dir), iteration=run.iteration, algo=cfg.algo, dataset=name,
                  test_steps=cfg.test_steps, test_lr=cfg.test_lr)
    if not math.isfinite(result["loss"]):
        raise NonFiniteError(f"{ns.split} loss is not finite: {likely_cause(cfg, 'test', run.learner.config.inner_solver)}")
    on = f", {name}" if name != cfg.dataset else ""
    if ns.json:
        print(strict_dumps(result))
    elif result["accuracy"] is not None:
        print(f"{ns.split} accuracy: {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}% "
              f"({result['episodes']} episodes, seed {result['seed']}, iteration {run.iteration}{on})")
    else:
        print(f"{ns.split} loss: {result['loss']:.4f} ± {result['loss_ci95']:.4f} ({result['episodes']} episodes{on})")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    if ns.data_command != "check":
        raise UsageError("expected `mrml data check --dataset NAME --root PATH`")
    from .data.check import check_main

    return check_main(ns.dataset, ns.root, ns.split_file)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}
# modules that add subcommands: each has add_commands(subparsers, COMMANDS) registering name -> handler
PLUGIN_COMMANDS: list[str] = ["mrml.bench", "mrml.report", "mrml.runs"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: exit 0, 2 (bad input, one line), 3 (training diverged), 130/143 (SIGINT/SIGTERM)."""
    from . import interrupts

    handlers = {}
    try:
        handlers = interrupts.install()
        parser = build_parser()
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        return COMMANDS[ns.command](ns)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        if not getattr(e, "reported", False):
            print("interrupted", file=sys.stderr)
        return 128 + signum
    finally:
        interrupts.restore(handlers)


if __name__ == "__main__":
    sys.exit(main())
