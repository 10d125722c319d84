"""Two gloo processes on CPU: same parameters as one process after 3 iterations; a dead rank stops the other."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ARGS = ["--dataset", "sinusoid", "--ways", "1", "--shots", "5", "--query", "5", "--meta-batch", "4",
        "--inner-steps", "3", "--cg-steps", "3", "--inner-lr", "0.01", "--val-episodes", "2", "--test-episodes", "2",
        "--log-every", "1", "--no-progress", "--device", "cpu", "--dist-timeout", "20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, iterations: int | None, world: int, port: int, args: list[str] = ARGS,
           entry: tuple[str, ...] = ("-m", "mrml")) -> list[subprocess.Popen]:
    """`world` ranks of `python ENTRY train ARGS [--iterations N] --out OUT` over gloo on 127.0.0.1:port."""
    its = ["--iterations", str(iterations)] if iterations is not None else []
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, *entry, "train", *args, *its, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_for_records(out: Path, lines: int, timeout: float = 60) -> None:
    """Poll until OUT/metrics.jsonl holds `lines` records (or the timeout passes)."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        time.sleep(0.2)


def run_single(args: list[str], out: Path) -> None:
    """The same training in one process (no distributed environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "mrml", "train", *args, "--out", str(out)], env=env, check=True,
                   capture_output=True, timeout=120)


def test_two_gloo_ranks_match_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_single([*ARGS, "--iterations", "3"], single)
    procs = launch(multi, 3, 2, free_port())
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(multi / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


def test_two_gloo_ranks_match_single_process_with_augment(tmp_path):
    """Each rank augments its episodes exactly as one process would (the counter follows the episode index)."""
    import fixtures_formats as fx

    root = fx.r2d2_pngs(tmp_path / "data", fx.CIFAR_SPLIT)
    split = fx.write_split(tmp_path / "split.json", fx.CIFAR_SPLIT, images_per_class=fx.PER_CLASS)
    args = ["--dataset", "cifar-fs", "--data-root", str(root), "--split-file", str(split), "--augment", "--ways", "3",
            "--shots", "1", "--query", "2", "--meta-batch", "4", "--width", "4", "--inner-steps", "2", "--cg-steps", "2",
            "--val-episodes", "2", "--test-episodes", "2", "--no-progress", "--device", "cpu", "--dist-timeout", "30",
            "--iterations", "2", "--optimizer", "sgd", "--outer-lr", "0.5"]
    single, multi, port = tmp_path / "single", tmp_path / "multi", free_port()
    run_single(args, single)
    procs = launch(multi, None, 2, port, args)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    a = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(multi / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)  # unmatched crops differ by O(1)


def test_dead_rank_stops_the_other(tmp_path):
    out = tmp_path / "run"
    procs = launch(out, 100000, 2, free_port())
    wait_for_records(out, 2)
    procs[1].send_signal(signal.SIGKILL)
    started = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode not in (0, None)
    assert time.time() - started < 45
    assert "stopped answering" in err, err[-2000:]


SLOW_VALIDATION = r"""
import sys, time
import mrml.train as t
orig = t.episode_scores
def slow(*a, **k):
    time.sleep(0.5 * len(a[7]))  # a[7]: the episode indices this rank scores
    return orig(*a, **k)
t.episode_scores = slow
from mrml.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_validation_longer_than_the_timeout_does_not_starve_ranks(tmp_path):
    """8 validation episodes at 0.5 s each: 4 s on rank 0 alone would outlast --dist-timeout 3 for the rank
    waiting in the next step; shared, each rank takes 2 s. The validation records equal a single process's."""
    single, multi, port = tmp_path / "single", tmp_path / "multi", free_port()
    i = ARGS.index("--val-episodes")
    args = [*ARGS[:i], *ARGS[i + 2:], "--val-episodes", "8", "--val-every", "1", "--iterations", "2"]
    args[args.index("--dist-timeout") + 1] = "3"
    run_single(args, single)
    procs = launch(multi, None, 2, port, args, entry=("-c", SLOW_VALIDATION))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]

    def validation(out: Path) -> list[tuple]:
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["loss"]) for r in recs if r["split"] == "validation"]

    a, b = validation(single), validation(multi)
    assert [i for i, _ in a] == [i for i, _ in b] == [1, 2]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6)


def test_sigterm_stops_every_rank_cleanly(tmp_path):
    out = tmp_path / "run"
    procs = launch(out, 100000, 2, free_port())
    wait_for_records(out, 3)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=60) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 143 and "Traceback" not in se, se[-2000:]
    assert "interrupted" in results[0][0] and "interrupted" not in results[1][0] + results[1][1]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] >= 3
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {state["iteration"]}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "mrml", "train", "--resume", str(out), "--iterations",
                           str(state["iteration"] + 1), "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
