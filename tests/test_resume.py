"""Exact resume: a real SIGINT/SIGTERM during a step, a validation or a checkpoint write, then `--resume`,
ends bit-exact (parameters, optimizer steps, metrics) against an uninterrupted run, with and without --augment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures_formats as fx
from mrml.cli import main

SINUSOID = ["--dataset", "sinusoid", "--ways", "1", "--shots", "5", "--query", "5", "--meta-batch", "2",
            "--inner-steps", "2", "--cg-steps", "2", "--inner-lr", "0.01"]
COMMON = ["--val-episodes", "2", "--test-episodes", "2", "--log-every", "1", "--val-every", "2",
          "--checkpoint-every", "3", "--no-progress", "--device", "cpu", "--threads", "1", "--iterations", "6"]
TIMING = {"seconds", "peak_mb", "cuda_peak_mb", "meter"}

# Runs `mrml train ARGS` after patching one function of mrml.train to send this process a real signal
# on its Nth call: all_reduce_step (mid-step), Run.validate (mid-validation) or save_checkpoint (mid-write).
WRAPPER = r"""
import importlib, os, signal, sys
where, nth, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
module, _, path = {"step": "mrml.train:distributed.all_reduce_step", "validation": "mrml.train:Run.validate",
                   "checkpoint": "mrml.train:save_checkpoint", "startup": "mrml.train:build_run",
                   "bench": "mrml.bench:run_in_subprocess"}[where].partition(":")
owner = importlib.import_module(module)
*parents, name = path.split(".")
for p in parents:
    owner = getattr(owner, p)
orig, calls = getattr(owner, name), [0]
def patched(*a, **k):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), sig)
    return orig(*a, **k)
setattr(owner, name, patched)
from mrml.cli import main
sys.exit(main(sys.argv[4:]))
"""


def interrupted_run(args: list[str], where: str, nth: int, sig: str, command: str = "train") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", WRAPPER, where, str(nth), sig, command, *args],
                          env=env, capture_output=True, text=True, timeout=180)


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert sa["iteration"] == sb["iteration"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    steps = {int(s["step"]) for s in sb["optimizer"]["state"].values()}
    assert steps == {sa["iteration"]}, steps  # no optimizer step repeated or lost
    for k, v in sa["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, sb["optimizer"]["state"][k][name]), (k, name)
    assert records(a) == records(b)
    fa, fb = (json.loads((p / "final.json").read_text()) for p in (a, b))
    assert (fa["loss"], fa["accuracy"], fa["best_validation"]) == (fb["loss"], fb["accuracy"], fb["best_validation"])


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("cifar")
    root = fx.r2d2_pngs(tmp / "data", fx.CIFAR_SPLIT)
    split = fx.write_split(tmp / "split.json", fx.CIFAR_SPLIT, images_per_class=fx.PER_CLASS)
    return ["--dataset", "cifar-fs", "--data-root", str(root), "--split-file", str(split), "--ways", "3", "--shots", "1",
            "--query", "2", "--meta-batch", "2", "--width", "4", "--inner-steps", "2", "--cg-steps", "2", "--augment"]


@pytest.mark.parametrize("where,nth,sig,code", [
    ("step", 2, "SIGTERM", 143),        # mid-step: the step is finished, then checkpointed
    ("validation", 2, "SIGINT", 130),   # validation of iteration 4 abandoned, redone first on resume
    ("checkpoint", 1, "SIGTERM", 143),  # during the periodic checkpoint write of iteration 3
])
@pytest.mark.parametrize("data", ["sinusoid", "augment"])
def test_interrupt_then_resume_is_exact(tmp_path, capsys, cifar, data, where, nth, sig, code):
    args = (SINUSOID if data == "sinusoid" else cifar) + COMMON
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *args, "--out", str(ref)]) == 0
    p = interrupted_run([*args, "--out", str(run)], where, nth, sig)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr and "interrupted" in p.stdout, p.stdout + p.stderr
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 0 < stopped["iteration"] < 6
    assert not list(run.glob(".checkpoint.pt.*"))
    assert not (run / "final.json").exists()
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)


def test_signal_during_final_meta_test_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    i = COMMON.index("--checkpoint-every")  # replaced below, not repeated: an option is given once
    args = [*SINUSOID, *COMMON[:i], *COMMON[i + 2:], "--out", str(run)]
    # the 2nd checkpoint write is the last one (iteration 6), right before the meta-test
    p = interrupted_run([*args, "--checkpoint-every", "6"], "checkpoint", 1, "SIGINT")
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert "final meta-test" in p.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 6
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "final.json").exists()


@pytest.mark.parametrize("where,command,args", [
    ("startup", "train", [*SINUSOID, *COMMON]),
    ("bench", "bench", ["memory", "--width", "4", "--image-size", "16", "--ways", "3", "--shots", "1", "--query", "1",
                        "--meta-batch", "1", "--repeats", "1", "--algos", "mrml", "--steps", "1", "--device", "cpu"]),
])
def test_signal_elsewhere_is_one_line(tmp_path, where, command, args):
    """Ctrl-C while a run starts or during `bench memory`: exit 130 and one line, no traceback."""
    if command == "train":
        args = [*args, "--out", str(tmp_path / "run")]
    p = interrupted_run(args, where, 1, "SIGINT", command)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == "interrupted", p.stderr


def test_stale_final_json_goes_when_a_resumed_run_stops(tmp_path):
    run = tmp_path / "run"
    args = [*SINUSOID, *COMMON[:-1], "4", "--out", str(run)]  # COMMON ends with --iterations 6
    assert main(["train", *args]) == 0 and (run / "final.json").exists()
    p = interrupted_run(["--resume", str(run), "--iterations", "6", "--no-progress"], "step", 1, "SIGTERM")
    assert p.returncode == 143, p.stderr
    assert not (run / "final.json").exists()  # a final.json of 4 iterations would pass for this unfinished run


def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path):
    """Two SIGINTs within one step: no waiting for the step, no new checkpoint, the old one intact and resumable."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [*SINUSOID, *COMMON]
    assert main(["train", *args, "--out", str(ref)]) == 0
    twice = WRAPPER.replace("os.kill(os.getpid(), sig)", "os.kill(os.getpid(), sig); os.kill(os.getpid(), sig)")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", twice, "step", "5", "SIGINT", "train", *args, "--out", str(run)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert "interrupted twice" in p.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 3  # the periodic one
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)
