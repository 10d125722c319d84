"""Episodes prepared on a background thread (`--prefetch`): the same tensors as the serial loop, resumable,
errors surfacing as the same one line, and no thread left behind however training stops."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures_formats as fx
from mrml.cli import main
from mrml.config import RunConfig
from mrml.errors import Interrupted, NonFiniteError
from mrml.prefetch import EpisodeFeed, EpisodePrefetcher
from mrml.train import build_run, train

SMALL = ["--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4", "--inner-steps", "2",
         "--val-episodes", "2", "--test-episodes", "2", "--val-every", "2", "--log-every", "1", "--no-progress",
         "--device", "cpu", "--threads", "1"]


def episode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mrml-episodes"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cifar")
    root = fx.r2d2_pngs(tmp / "data", fx.CIFAR_SPLIT)
    split = fx.write_split(tmp / "split.json", fx.CIFAR_SPLIT, images_per_class=fx.PER_CLASS)
    return {"dataset": "cifar-fs", "data_root": str(root), "split_file": str(split)}


def assert_same_episodes(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        for f in dataclasses.fields(ea):
            ta, tb = getattr(ea, f.name), getattr(eb, f.name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f.name


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("indices", [range(0, 3), range(1, 3, 2)])  # all tasks; rank 1's share of 2 processes
def test_prefetched_episodes_identical_to_serial(cifar, augment, indices):
    cfg = RunConfig(**cifar, ways=3, shots=1, query=2, meta_batch=3, augment=augment, width=4, device="cpu",
                    dtype="float64", seed=3)
    run = build_run(cfg)
    if augment:
        assert run.source.splits["train"].preprocess.augment
    with EpisodeFeed(run, 0, 5, indices, ahead=2) as feed:
        prefetched = [feed(it) for it in range(5)]
    # serial, in another order: each episode is a function of (seed, its index) only
    serial = [run.episodes(it, indices) for it in reversed(range(5))][::-1]
    for p, s in zip(prefetched, serial):
        assert_same_episodes(p, s)
    assert prefetched[0][0].support_x.dtype == torch.float64
    if augment:  # the augmentation did change the images (else this test could not tell orders apart)
        plain = build_run(dataclasses.replace(cfg, augment=False)).episodes(0, indices)
        assert not torch.equal(plain[0].support_x, serial[0][0].support_x)


def test_prefetcher_hands_over_iterations_before_the_error():
    def make(it: int) -> int:
        if it == 3:
            raise ValueError("damaged at 3")
        return it

    pf = EpisodePrefetcher(make, 1, 10, ahead=2)
    assert [pf.get(1), pf.get(2)] == [1, 2]
    with pytest.raises(ValueError, match="damaged at 3"):
        pf.get(3)
    pf.close()
    assert not pf.thread.is_alive()


def checkpoint_of(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "peak_mb", "meter")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_prefetch_resume_identical(tmp_path, cifar):
    data = ["--dataset", "cifar-fs", "--data-root", cifar["data_root"], "--split-file", cifar["split_file"], "--augment"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *data, *SMALL, "--iterations", "5", "--prefetch", "0", "--out", str(ref)]) == 0
    assert main(["train", *data, *SMALL, "--iterations", "2", "--prefetch", "3", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["prefetch"] == 3
    assert main(["train", "--resume", str(run), "--iterations", "5"]) == 0
    a, b = checkpoint_of(ref), checkpoint_of(run)
    assert a["iteration"] == b["iteration"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert records(ref) == records(run)
    for out in (ref, run):
        final = json.loads((out / "final.json").read_text())
        assert final["data_wait_s"] >= 0 and b["data_wait"][1] == 5
    assert not episode_threads()


def test_prefetch_error_surfaces_one_line(tmp_path, capsys):
    root = fx.tiered_png(tmp_path / "d", fx.TIERED_SPLIT)
    split = fx.write_split(tmp_path / "split.json", fx.TIERED_SPLIT)
    blobs = [fx.png_bytes(img) for img in fx.images(12, (84, 84, 3), seed=1)]
    blobs[5] = np.frombuffer(b"\x89PNG\r\n\x1a\n damaged mid-file", np.uint8)  # 2nd image of the 2nd class
    fx.write_pickle(root / "train_images_png.pkl", blobs)
    errors = {}
    for ahead in ("0", "2"):
        out = tmp_path / f"run{ahead}"
        code = main(["train", "--dataset", "tiered-imagenet", "--data-root", str(root), "--split-file", str(split),
                     *SMALL, "--iterations", "20", "--prefetch", ahead, "--out", str(out)])
        err = capsys.readouterr().err  # besides the file readers' progress lines (\r), one line
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "reading " not in line]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        errors[ahead] = lines[0]
        assert not episode_threads()
    assert errors["0"] == errors["2"]
    assert "image 5 of" in errors["2"] and "not a readable image" in errors["2"]


@pytest.mark.parametrize("how", ["sigint", "keyboard", "nan", "error"])
def test_prefetch_stops_on_interrupt(tmp_path, monkeypatch, how):
    """However the loop stops, the episode thread (blocked on a full queue by then) stops with it."""
    import mrml.train as mt

    orig, calls, seen = mt.distributed.all_reduce_step, [0], []

    def patched(*a, **k):
        calls[0] += 1
        seen.append(len(episode_threads()))
        stats = orig(*a, **k)
        if calls[0] == 2:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            elif how == "keyboard":
                raise KeyboardInterrupt
            elif how == "nan":
                return dataclasses.replace(stats, loss=float("nan"))
            else:
                raise RuntimeError("step failed")
        return stats

    monkeypatch.setattr(mt.distributed, "all_reduce_step", patched)
    cfg = RunConfig(dataset="tiny", ways=3, shots=1, query=2, meta_batch=2, width=4, iterations=50, prefetch=2,
                    val_every=100, device="cpu", out=str(tmp_path / "run"))
    expected = {"sigint": Interrupted, "keyboard": KeyboardInterrupt, "nan": NonFiniteError, "error": RuntimeError}[how]
    with pytest.raises(expected):
        train(cfg, progress=False)
    assert seen[0] == 1  # the thread was running during the steps
    assert not episode_threads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetched_episodes_identical_on_cuda(cifar):
    """On CUDA the thread pins the episodes and the loop copies them with non_blocking=True: same tensors."""
    cfg = RunConfig(**cifar, ways=3, shots=1, query=2, meta_batch=2, augment=True, width=4, device="cuda")
    run = build_run(cfg)
    with EpisodeFeed(run, 0, 3, range(2), ahead=2) as feed:
        prefetched = [feed(it) for it in range(3)]
    torch.cuda.synchronize()
    for it, eps in enumerate(prefetched):
        assert eps[0].support_x.is_cuda
        assert_same_episodes(eps, run.episodes(it, range(2)))
