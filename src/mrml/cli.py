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


def _once(base: type) -> type:
    """argparse's `base` action (`store`, `store_true`, `store_false`), refusing an option or switch given
    twice (`--resume A --resume B`, `--learn-l2 --learn-l2`: which one was meant?)."""

    class Once(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            given = namespace.__dict__.setdefault("_given_once", {})
            if option_string is not None and self.dest in given:
                both = f" ({given[self.dest]!r}, then {values!r})" if self.nargs != 0 else ""
                parser.error(f"{option_string} given twice{both}: give it once")
            given[self.dest] = values
            super().__call__(parser, namespace, values, option_string)

    Once.__name__ = Once.__qualname__ = "_" + base.__name__.strip("_").replace("Action", "Once")  # _StoreOnce, ...
    return Once


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        store = _once(argparse._StoreAction)  # every single-valued option and switch: once
        self.register("action", None, store)
        self.register("action", "store", store)
        self.register("action", "store_true", _once(argparse._StoreTrueAction))
        self.register("action", "store_false", _once(argparse._StoreFalseAction))

    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """`mrml train`'s settings, made from their declarations (RunConfig and AlgoConfig fields; names: `train_settings`)."""
    from .algorithms.algo_config import AlgoConfig
    from .config import RunConfig
    from .settings import add_options

    add_options(p.add_argument_group("task source, model, outer loop and run"), RunConfig)
    add_options(p.add_argument_group("algorithm (AlgoConfig)"), AlgoConfig)


def train_settings() -> list[str]:
    """The names of `mrml train`'s setting options (every command-line field of RunConfig and AlgoConfig)."""
    from .algorithms.algo_config import AlgoConfig
    from .config import RunConfig
    from .settings import cli_settings

    return [f.name for cls in (RunConfig, AlgoConfig) for f in cli_settings(cls)]


def replace_options(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`base` with the options that `extra` gives again replaced by `extra`'s (an option may be given once).

    Example:
        >>> replace_options(["--ways", "3", "--no-progress", "--width", "4"], ["--ways", "5"])
        ['--no-progress', '--width', '4', '--ways', '5']
    """
    given = {a for a in extra if a.startswith("--")}
    kept, skip = [], False
    for a in base:
        if skip and not a.startswith("--"):
            skip = False
            continue
        skip = a in given
        if not skip:
            kept.append(a)
    return [*kept, *extra]


def explicit_options(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in names if getattr(ns, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrml", description="Memory-reduced meta-learning and its baselines.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("train", help="meta-train (default: glyphs 5-way 1-shot with mrml)")
    _add_train_options(p)
    p.add_argument("--config", metavar="FILE.json", default=None,
                   help="settings from a JSON file, e.g. a run's config.json (options given here win; its `out` is "
                        "ignored: the new run goes to --out or a fresh folder)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run in DIR where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="meta-test the checkpoint of a run folder (on its dataset or another)")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=None, help="episode seed (default: the run's eval seed)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    from .algorithms.algo_config import AlgoConfig
    from .config import RunConfig
    from .settings import add_options

    override = " (default: the run's)"
    add_options(p, RunConfig, only=("dataset",), suffix="; default: the run's. Another dataset is resized and "
                                                        "converted to the run's input shape")
    p.add_argument("--data-root", default=None, help="dataset folder (of --dataset, or the run's if it moved)")
    add_options(p, RunConfig, only=("split_file", "ways", "shots", "query", "device"), suffix=override)
    add_options(p, AlgoConfig, only=("test_steps", "test_lr"), suffix=override)
    from .algorithms import finetune as ft

    p.add_argument("--adapt", default=None, metavar="|".join(ft.ADAPT_MODES),
                   help="what adapts on each support set: head (default: the algorithm's own test-time adaptation, "
                        "trunk frozen), last-block or all (then that part fine-tuned by Adam from the trained weights), "
                        "auto (head or last-block per task, chosen by cross-validation over the support shots)")
    p.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                   help=f"Adam steps of the fine-tuning (default {ft.DEFAULT_ADAPT_STEPS}; not with --adapt head)")
    p.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                   help=f"Adam step size of the fine-tuning (default {ft.DEFAULT_ADAPT_LR:g}; not with --adapt head)")
    p.add_argument("--adapt-prox", type=float, default=None, metavar="P",
                   help=f"proximal strength: + P/2 ||theta - theta0||^2 on the fine-tuned part (default "
                        f"{ft.DEFAULT_ADAPT_PROX:g}; not with --adapt head)")
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
    from .config import RunConfig, read_config_file
    from .train import train

    opts = explicit_options(ns, train_settings())
    if ns.resume is not None:
        extra = set(opts) - {"iterations"}
        if ns.config is not None:
            extra.add("config")
        if extra:
            raise UsageError(f"--resume continues a run with its saved settings; only --iterations may change (got --{sorted(extra)[0].replace('_', '-')})")
        train(resume=ns.resume, iterations=opts.get("iterations"), progress=not ns.no_progress)
    else:
        base = read_config_file(ns.config) if ns.config is not None else None
        cfg = RunConfig.resolve(opts, base)
        cfg.check_for_training()
        train(cfg, progress=not ns.no_progress)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .checkpoint import strict_dumps
    from .runs import eval_dataset, load_run
    from .train import likely_cause
    from .validation import EVAL_RANGES, check_all
    from .algorithms.finetune import adapt_settings

    check_all(ns, EVAL_RANGES)
    adapt = adapt_settings("head" if ns.adapt is None else ns.adapt, ns.adapt_steps, ns.adapt_lr, ns.adapt_prox,
                           flags={"adapt": "--adapt", "steps": "--adapt-steps", "lr": "--adapt-lr",
                                  "prox": "--adapt-prox"})
    if ns.data_root and not Path(ns.data_root).is_dir():
        raise UsageError(f"--data-root {ns.data_root} is not a folder: pass the folder that holds the dataset")
    run = load_run(ns.run_dir, device=ns.device, test_steps=ns.test_steps, test_lr=ns.test_lr,
                   data_root=ns.data_root if ns.dataset is None else None)  # the run's own data, moved
    refuse_nonfinite_state(run)
    cfg = run.config
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    dataset = eval_dataset(run, ns.dataset, ns.data_root, ns.split_file)
    name = ns.dataset or cfg.dataset
    result = run.evaluate(dataset, ns.split, ns.episodes, ns.ways, ns.shots, ns.query,
                          cfg.eval_seed if ns.seed is None else ns.seed, progress=not ns.json,
                          adapt=adapt.mode, adapt_steps=adapt.steps, adapt_lr=adapt.lr, adapt_prox=adapt.prox)
    result.update(run_dir=str(ns.run_dir), iteration=run.iteration, algo=cfg.algo, dataset=name,
                  test_steps=cfg.test_steps, test_lr=cfg.test_lr)
    if not math.isfinite(result["loss"]):
        raise NonFiniteError(f"{ns.split} loss is not finite: {likely_cause(cfg, 'test', run.learner.config.inner_solver)}")
    on = f", {name}" if name != cfg.dataset else ""
    if adapt.mode != "head":
        on += f", --adapt {adapt.mode}: {adapt.steps} Adam steps at {adapt.lr:g}, prox {adapt.prox:g}"
        if "auto_last_block_share" in result:
            on += f", last-block in {100 * result['auto_last_block_share']:.0f}% of episodes"
    if ns.json:
        print(strict_dumps(result))
    elif result["accuracy"] is not None:
        print(f"{ns.split} accuracy: {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}% "
              f"({result['episodes']} episodes, seed {result['seed']}, iteration {run.iteration}{on})")
    else:
        print(f"{ns.split} loss: {result['loss']:.4f} ± {result['loss_ci95']:.4f} ({result['episodes']} episodes{on})")
    return 0


def refuse_nonfinite_state(run: Any) -> None:
    """One-line UsageError when a loaded run's learned state (weights, learned lambda, ...) is not finite:
    a checkpoint that holds inf or NaN is damaged, and evaluating it would print a meaningless score."""
    import torch

    for name, value in {**run.model.state_dict(), **run.learner.state_dict()}.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            what = "the learned lambda (log_l2)" if name.endswith("log_l2") else f"{name!r}"
            raise UsageError(f"{Path(run.run_dir) / 'checkpoint.pt'} is damaged: {what} is not finite "
                             f"({value.flatten()[~torch.isfinite(value.flatten())][0].item()}): restore it from a "
                             "copy or train again")


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
