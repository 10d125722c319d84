"""The command line as a user runs it: outputs, resume, eval, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from mrml.cli import main

FAST = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--inner-steps", "3", "--cg-steps", "3", "--val-every", "2", "--val-episodes", "3", "--test-episodes", "5",
        "--log-every", "1", "--no-progress"]


def train(out: Path, *extra: str) -> int:
    return main(["train", *FAST, "--out", str(out), *extra])


def test_train_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "3") == 0
    assert "meta-test accuracy" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algo"] == "mrml" and cfg["ways"] == 3 and cfg["iterations"] == 3 and cfg["inner_steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["iteration"] for r in train_recs] == [1, 2, 3]
    for r in train_recs:
        assert {"iteration", "loss", "accuracy", "seconds", "peak_mb"} <= set(r) and r["peak_mb"] > 0
    final = json.loads((out / "final.json").read_text())
    assert 0 <= final["accuracy"] <= 1 and final["episodes"] == 5 and final["ci95"] >= 0
    assert (out / "checkpoint.pt").is_file()


def test_resume_continues_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, "--iterations", "4") == 0
    assert train(b, "--iterations", "2") == 0
    assert main(["train", "--resume", str(b), "--iterations", "4", "--no-progress"]) == 0
    sa = torch.load(a / "checkpoint.pt", weights_only=True)
    sb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert sa["iteration"] == sb["iteration"] == 4
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"], r["loss"]) for r in ra] == [(r["split"], r["iteration"], r["loss"]) for r in rb]


def test_eval_json_reproducible(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "0") == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "7", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--episodes", "7", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["episodes"] == 7 and 0 <= first["accuracy"] <= 1 and "ci95" in first
    assert first == second
    assert main(["eval", str(out), "--episodes", "7", "--json", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    # test-time adaptation overridden: recorded, and it changes the predictions (0 steps: the zero head)
    assert main(["eval", str(out), "--episodes", "7", "--json", "--test-steps", "0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero["test_steps"] == 0 and first["test_steps"] == 20 and zero["loss"] != first["loss"]
    assert zero["loss"] == pytest.approx(math.log(3))  # uniform predictions over the 3 ways of FAST
    assert_one_line_error(capsys, main(["eval", str(out), "--test-lr", "0"]), "--test-lr must be > 0")


def assert_one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--algo", "nope"], "unknown algorithm"),
    (["--ways", "9"], "lower --ways"),
    (["--shots", "0"], "--shots must be >= 1"),
    (["--shots", "7", "--query", "5"], "lower --shots"),
    (["--backbone", "nope"], "unknown backbone"),
    (["--preset", "nope"], "unknown preset"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "bogus"], "device"),
    (["--inner", "nothing.here"], "names no parameter"),
    (["--test-lr", "0"], "--test-lr must be > 0"),
    (["--test-steps", "-1"], "--test-steps must be >= 0"),
    (["--algo", "anil", "--task-chunk", "2"], "apply to mrml and imaml, not anil"),
])
def test_bad_settings_one_line(tmp_path, capsys, args, needle):
    code = main(["train", *FAST, "--out", str(tmp_path / "r"), "--iterations", "1", *args])
    assert_one_line_error(capsys, code, needle)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(capsys, train(blocker / "run", "--iterations", "1"), "cannot write")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert_one_line_error(capsys, train(ro / "run", "--iterations", "1"), "cannot write")


def test_existing_run_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert_one_line_error(capsys, train(out, "--iterations", "2"), "already holds a run")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_missing_and_foreign_checkpoints(tmp_path, capsys):
    assert_one_line_error(capsys, main(["eval", str(tmp_path / "none")]), "not a folder")
    assert_one_line_error(capsys, main(["eval", str(tmp_path)]), "no checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(capsys, main(["eval", str(tmp_path)]), "not an mrml checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    assert_one_line_error(capsys, main(["eval", str(tmp_path)]), "not an mrml checkpoint")
    assert_one_line_error(capsys, main(["train", "--resume", str(tmp_path)]), "not an mrml checkpoint")
    assert (tmp_path / "checkpoint.pt").is_file()


def test_tensorboard_optional(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert_one_line_error(capsys, train(tmp_path / "r", "--iterations", "1", "--tensorboard"), "pip install tensorboard")
        return
    assert train(tmp_path / "r", "--iterations", "2", "--tensorboard") == 0
    assert list((tmp_path / "r" / "tensorboard").glob("events.*"))
