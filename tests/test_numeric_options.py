"""Property: every numeric option of `train`, `eval` and `bench memory` given -1, 0, nan, inf or 10^23 either
runs (exit 0, or 3 when training diverges) or is refused in one line with exit 2, never a traceback."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mrml import bench
from mrml.cli import build_parser, main

VALUES = ["-1", "0", "nan", "inf", "1e23", str(10**23)]
TRAIN = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
         "--inner-steps", "2", "--cg-steps", "2", "--test-steps", "2", "--val-every", "1", "--val-episodes", "1",
         "--test-episodes", "1", "--iterations", "1", "--threads", "1", "--no-progress"]
EVAL = ["--episodes", "1"]
BENCH = ["--width", "4", "--image-size", "16", "--ways", "3", "--shots", "2", "--query", "2", "--meta-batch", "1",
         "--repeats", "1", "--cg-steps", "3", "--device", "cpu", "--threads", "1", "--algos", "mrml", "--variants",
         "default", "--steps", "1"]


def numeric_options(*path: str) -> list[str]:
    """The --options of subcommand `path` that take an int or a float (new ones are picked up by themselves)."""
    parser: argparse.ArgumentParser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return [a.option_strings[0] for a in parser._actions if a.option_strings and a.type in (int, float)]


def without(args: list[str], option: str) -> list[str]:
    """`args` less `option` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


def run(capsys, argv: list[str], ok: set[int]) -> None:
    threads = torch.get_num_threads()
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    assert code in ok | {2}, (argv, code, err)
    if code == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, (argv, err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numeric") / "run"
    assert main(["train", *without(TRAIN, "--iterations"), "--iterations", "0", "--out", str(out)]) == 0
    return out


def test_every_train_option(tmp_path, capsys):
    options = numeric_options("train")
    assert {"--seed", "--width", "--threads", "--dist-timeout", "--val-episodes", "--cg-tol"} <= set(options)
    for i, option in enumerate(options):
        for j, value in enumerate(VALUES):
            run(capsys, ["train", *without(TRAIN, option), option, value, "--out", str(tmp_path / f"r{i}-{j}")], {0, 3})


def test_every_eval_option(run_dir, capsys):
    options = numeric_options("eval")
    assert {"--episodes", "--seed", "--test-steps", "--test-lr"} <= set(options)
    for option in options:
        for value in VALUES:
            run(capsys, ["eval", str(run_dir), *without(EVAL, option), option, value], {0, 3})


def test_every_bench_option(capsys, monkeypatch):
    """Settings are checked in the parent; the measuring children are stubbed (they are tested in test_bench)."""
    monkeypatch.setattr(bench, "run_in_subprocess", lambda s, algo, variant, k: {
        **bench.base_record(algo, variant, k, s.device), "error": "not measured here"})
    options = numeric_options("bench", "memory")
    assert {"--seed", "--timeout", "--width", "--image-size"} <= set(options)
    for option in options:
        for value in VALUES:
            run(capsys, ["bench", "memory", *without(BENCH, option), option, value], {0, 1})


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser of `mrml`, with the words that reach it."""
    out = [(path, parser)] if path else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += subcommands(sub, (*path, name))
    return out


def test_every_single_valued_option_given_twice_is_refused(capsys):
    """`--resume A --resume B` and the like: which one was meant? One line, exit 2, whatever the command."""
    checked = set()
    for path, parser in subcommands(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.nargs is not None or type(action).__name__ != "_StoreOnce":
                continue
            first, second = (list(action.choices)[:2] if action.choices and len(action.choices) > 1
                             else ["1", "2"] if action.type in (int, float) else ["a", "b"])
            option = action.option_strings[0]
            code = main([*path, option, first, option, second])
            err = capsys.readouterr().err.strip()
            assert code == 2 and err.startswith("error:") and "\n" not in err, (path, option, err)
            assert f"{option} given twice" in err, (path, option, err)
            checked.add((path[0], option))
    assert {("train", "--resume"), ("train", "--config"), ("train", "--ways"), ("eval", "--episodes"),
            ("bench", "--steps"), ("data", "--root")} <= checked


def refused(capsys, argv: list[str], needle: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, (argv, err)
    assert needle in err, (argv, err)


# the command-line cases of issues 18 and 21: each one line and exit 2 (named tests for each in test_cli.py)
CASES = [
    (["--ways", "1"], "--ways 2 or more"),
    (["--dataset", "sinusoid", "--ways", "1", "--backbone", "conv4"], "use --backbone mlp"),
    (["--dataset", "sinusoid", "--ways", "1", "--backbone", "resnet12"], "use --backbone mlp"),
    (["--inner-steps", "0", "--inner-solver", "newton"], "--inner-steps >= 1"),
    (["--learn-l2", "--no-learn-l2"], "not allowed with"),
    (["--prox", "--no-prox"], "not allowed with"),
    (["--amp", "fp16", "--device", "cpu"], "--amp bf16"),
    (["--outer-lr", "1e38"], "--outer-lr must be"),
    (["--dataset", "sinusoid", "--ways", "1", "--data-root", "."], "drop --data-root"),
    *[(["--device", d], "device") for d in ("meta", "cpu:5", "xla", "cuda:99", *(() if torch.cuda.is_available()
                                                                                   else ("cuda",)),
                                         *(() if torch.backends.mps.is_available() else ("mps",)))],
]


@pytest.mark.parametrize("args, needle", CASES)
def test_command_line_cases_are_one_line(tmp_path, capsys, args, needle):
    base = TRAIN
    for option in args:
        if option.startswith("--") and option in base:
            base = without(base, option)
    refused(capsys, ["train", *base, *args, "--out", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r" / "config.json").exists()


def test_bench_steps_are_checked_before_anything_is_measured(capsys, monkeypatch):
    def measured(*_):
        raise AssertionError("a configuration was measured before --steps was checked")

    monkeypatch.setattr(bench, "run_in_subprocess", measured)
    refused(capsys, ["bench", "memory", *without(BENCH, "--steps"), "--steps", "1,1000000000"],
            "--steps expects comma-separated integers >= 1 and <= 1000000 (got 1000000000)")
