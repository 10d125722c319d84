"""Nothing lost, nothing silent: resume bounds, non-finite stops (exit 3), strict JSON, cut-off metrics lines,
the --out lock, tampered checkpoints and result files, a full disk, file modes."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mrml import checkpoint as ckpt
from mrml.cli import main
from mrml.runlock import RunLock

SIN = ["--dataset", "sinusoid", "--ways", "1", "--shots", "5", "--query", "5", "--meta-batch", "2",
       "--inner-steps", "2", "--cg-steps", "2", "--inner-lr", "0.01", "--val-episodes", "2", "--test-episodes", "2",
       "--log-every", "1", "--val-every", "2", "--no-progress", "--device", "cpu", "--threads", "1"]


def train(out: Path, *extra: str) -> int:
    """`mrml train` with SIN, whose options that `extra` gives again are dropped (an option is given once)."""
    given = {a for a in extra if a.startswith("--")}
    base = [a for i, a in enumerate(SIN)
            if a not in given and not (i and SIN[i - 1] in given and not a.startswith("--"))]
    return main(["train", *base, "--out", str(out), *extra])


def one_line(capsys, code: int, expected: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and all(n in err for n in needles), err
    return err


def strict_lines(path: Path) -> list[dict]:
    def refuse(token: str):
        raise AssertionError(f"{path} holds bare {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# -- 2: resume below what is done ------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["3", "-5"])
def test_resume_refuses_fewer_iterations(tmp_path, capsys, n):
    out = tmp_path / "run"
    assert train(out, "--iterations", "4") == 0
    before = (out / "final.json").read_text()
    capsys.readouterr()
    one_line(capsys, main(["train", "--resume", str(out), "--iterations", n, "--no-progress"]), 2, "--iterations")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert (out / "final.json").read_text() == before


# -- 3: non-finite values stop the run ---------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--inner-solver", "gd", "--inner-lr", "1e9", "--plain-inner"], "--inner-lr"),
    (["--outer-lr", "1e37", "--optimizer", "sgd"], "--outer-lr"),
    (["--inner-solver", "gd", "--test-lr", "1e37"], "--test-lr"),
])
def test_non_finite_stops_with_exit_3(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code = train(out, "--iterations", "3", "--checkpoint-every", "1", *extra)
    one_line(capsys, code, 3, needle, "not finite" if needle == "--test-lr" else "non-finite")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    if (out / "metrics.jsonl").exists():
        strict_lines(out / "metrics.jsonl")
    if (out / "final.json").exists():
        json.loads((out / "final.json").read_text(), parse_constant=lambda t: pytest.fail(t))


def test_results_are_strict_json(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2", "--test-episodes", "1", "--val-episodes", "1") == 0  # ci95 of 1 episode: NaN
    final = json.loads((out / "final.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    assert final["loss_ci95"] is None
    assert all(r.get("ci95", 0) is None for r in strict_lines(out / "metrics.jsonl") if r["split"] == "validation")


# -- 4: a cut-off or undecodable metrics line never blocks --resume ----------------------------------------
def test_cut_off_metrics_line_is_set_aside(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    metrics = out / "metrics.jsonl"
    good = metrics.read_bytes()
    metrics.write_bytes(good + b'{"split": "train", "iteration": 3, "lo' + b"\n" + b"\xff\xfe garbage\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    corrupt = out / "metrics.jsonl.corrupt"
    assert corrupt.read_bytes().count(b"\n") == 2 and "metrics.jsonl.corrupt" in captured.out + captured.err
    assert [r["iteration"] for r in strict_lines(metrics) if r["split"] == "train"] == [1, 2, 3]


# -- 5: one run per --out ----------------------------------------------------------------------------------
def test_out_is_locked_while_a_run_holds_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out).acquire()
    try:
        one_line(capsys, train(out, "--iterations", "1"), 2, "in use by another mrml train", str(os.getpid()))
        assert not (out / "metrics.jsonl").exists()
    finally:
        lock.release()
    (out / ".lock").write_text("999999999\n")  # stale: its process is gone, nobody holds the flock
    assert train(out, "--iterations", "1") == 0


# -- 8: tampered checkpoints, result files; a full disk; file modes -----------------------------------------
def tamper(out: Path, **changes) -> None:
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    torch.save(state, out / "checkpoint.pt")


@pytest.mark.parametrize("change", ["missing", "config_type", "config_value", "model"])
def test_tampered_checkpoint_is_one_line(tmp_path, capsys, change):
    out = tmp_path / "run"
    assert train(out, "--iterations", "1") == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    if change == "missing":
        tamper(out, model=None)
    elif change == "config_type":
        tamper(out, config={**state["config"], "ways": "one"})
    elif change == "config_value":
        tamper(out, config={**state["config"], "seed": -1})
    else:
        tamper(out, model={k: torch.zeros(3) for k in state["model"]})
    capsys.readouterr()
    one_line(capsys, main(["eval", str(out), "--episodes", "1"]), 2)
    one_line(capsys, main(["train", "--resume", str(out), "--iterations", "2", "--no-progress"]), 2)


def test_hand_edited_final_json_in_compare(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "1") == 0
    final = json.loads((out / "final.json").read_text())
    (out / "final.json").write_text(json.dumps({**final, "loss": "low", "seconds_per_iteration": [1]}))
    capsys.readouterr()
    one_line(capsys, main(["compare", str(out)]), 2, "final.json", "expected a number")


def test_full_disk_while_checkpointing_is_named(tmp_path, capsys, monkeypatch):
    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(ckpt.torch, "save", full)
    out = tmp_path / "run"
    one_line(capsys, train(out, "--iterations", "2"), 2, "disk", "full")
    assert not list(out.glob(".checkpoint.pt.*"))


def test_stale_temp_and_final_and_modes(tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train(out, "--iterations", "2") == 0
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "config.json", "final.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    (out / ".checkpoint.pt.x1y2").write_bytes(b"left by a killed write")
    assert main(["train", "--resume", str(out), "--iterations", "3", "--test-lr", "1"]) == 2  # refused: no change
    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    assert not list(out.glob(".checkpoint.pt.*"))


def test_eval_data_root_must_exist(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--iterations", "0", "--width", "4", "--test-episodes", "1",
                 "--val-episodes", "1", "--no-progress", "--out", str(out)]) == 0
    missing = tmp_path / "nonexistent"
    capsys.readouterr()
    one_line(capsys, main(["eval", str(out), "--data-root", str(missing), "--episodes", "1"]), 2, str(missing))
    assert not missing.exists()


def test_eval_with_a_diverging_test_lr_exits_3(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "1", "--inner-solver", "gd") == 0  # newton, the default, has no step size
    capsys.readouterr()
    one_line(capsys, main(["eval", str(out), "--episodes", "2", "--test-lr", "1e37", "--json"]), 3, "--test-lr")


def test_glyph_cache_mode_follows_the_umask(tmp_path):
    from mrml.data import glyphs

    old = os.umask(0o022)
    try:
        glyphs.build_glyphs(root=tmp_path, samples=1, image_size=8)
    finally:
        os.umask(old)
    (cache,) = tmp_path.glob("glyphs-*.npz")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644


def test_compare_skips_a_cut_off_non_utf8_last_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"split": "train", "iteration": 3, "loss": 1.\xff')
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["iteration"] == 2
