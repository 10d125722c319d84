"""Two gloo processes on CPU: same parameters as one process after 3 iterations; a dead rank stops the other."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ARGS = ["--dataset", "sinusoid", "--ways", "1", "--shots", "5", "--query", "5", "--meta-batch", "4",
        "--inner-steps", "3", "--cg-steps", "3", "--inner-lr", "0.01", "--val-episodes", "2", "--test-episodes", "2",
        "--log-every", "1", "--no-progress", "--device", "cpu", "--dist-timeout", "20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, iterations: int, world: int, port: int) -> list[subprocess.Popen]:
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "mrml", "train", *ARGS, "--iterations", str(iterations), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_gloo_ranks_match_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-m", "mrml", "train", *ARGS, "--iterations", "3", "--out", str(single)],
                   env=env, check=True, capture_output=True, timeout=120)
    procs = launch(multi, 3, 2, free_port())
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(multi / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


def test_dead_rank_stops_the_other(tmp_path):
    out = tmp_path / "run"
    procs = launch(out, 100000, 2, free_port())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    started = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode not in (0, None)
    assert time.time() - started < 45
    assert "stopped answering" in err, err[-2000:]
