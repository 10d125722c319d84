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
