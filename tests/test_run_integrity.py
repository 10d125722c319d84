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


# -- issue 21 item 6: run folders that cannot be hijacked or lost ------------------------------------------
def victim(tmp_path: Path, text: str = "precious\n") -> Path:
    """A file outside the run that a symlink in the run folder points to; it must never be written."""
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}


def test_lock_symlink_is_not_followed(tmp_path, capsys):
    target = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    one_line(capsys, train(out, "--iterations", "1"), 2, str(out / ".lock"), "symbolic link")
    assert target.read_text() == "precious\n" and (out / ".lock").is_symlink()
    assert not (out / "config.json").exists()


def test_dangling_lock_symlink_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "created-by-mrml"
    (out / ".lock").symlink_to(target)
    one_line(capsys, train(out, "--iterations", "1"), 2, "symbolic link")
    assert not os.path.lexists(target)


@pytest.mark.parametrize("kind", ["folder", "fifo", "hard_link"])
def test_lock_that_is_not_a_plain_file_is_refused(tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    if kind == "folder":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        os.link(victim(tmp_path), lock)
    needle = {"folder": "not a regular file", "fifo": "not a regular file", "hard_link": "2 hard links"}[kind]
    one_line(capsys, train(out, "--iterations", "1"), 2, str(lock), needle)
    if kind == "hard_link":
        assert (tmp_path / "elsewhere" / "victim.txt").read_text() == "precious\n"


def test_write_probe_symlink_is_not_followed(tmp_path):
    target = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".write-test").symlink_to(target)  # the name the old probe wrote (and truncated) through
    assert train(out, "--iterations", "1") == 0
    assert target.read_text() == "precious\n"


def test_atomic_write_replaces_a_symlink_without_writing_its_target(tmp_path):
    target = victim(tmp_path)
    link = tmp_path / "config.json"
    link.symlink_to(target)
    ckpt.atomic_json(link, {"a": 1})
    assert target.read_text() == "precious\n"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resume_replaces_symlinked_run_files_without_writing_their_targets(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    targets = {}
    for name in ("config.json", "final.json"):
        targets[name] = victim(tmp_path, f"not {name}\n").rename(tmp_path / "elsewhere" / name)
        (out / name).unlink()
        (out / name).symlink_to(targets[name])
    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    for name, target in targets.items():
        assert target.read_text() == f"not {name}\n"
        assert not (out / name).is_symlink()
    assert json.loads((out / "final.json").read_text())["iterations"] == 3


def test_resume_refuses_symlinked_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    target = victim(tmp_path, "secret line, not JSON\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"])
    one_line(capsys, code, 2, "metrics.jsonl", "symbolic link")
    assert target.read_text() == "secret line, not JSON\n" and not (out / "metrics.jsonl.corrupt").exists()


@pytest.mark.parametrize("dangling", [False, True])
def test_metrics_append_does_not_follow_a_symlink(tmp_path, dangling):
    from mrml.errors import UsageError
    from mrml.train import MetricsLog

    target = tmp_path / "missing.txt" if dangling else victim(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        MetricsLog(tmp_path / "metrics.jsonl", False)({"split": "train", "iteration": 1, "loss": 0.5})
    assert not os.path.lexists(target) if dangling else target.read_text() == "precious\n"


def test_metrics_fifo_is_refused_not_hung(tmp_path):
    from mrml.errors import UsageError

    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(UsageError, match="not a regular file"):
        ckpt.append_bytes(tmp_path / "metrics.jsonl", b"{}\n")


def test_tensorboard_symlink_is_refused(tmp_path):
    from mrml.errors import UsageError
    from mrml.train import MetricsLog

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UsageError, match="link or not a folder"):
        MetricsLog(tmp_path / "metrics.jsonl", True)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "final.json", "metrics.jsonl", "checkpoint.pt",
                                  "metrics.jsonl.corrupt", "tensorboard"])
def test_new_run_refuses_folder_with_run_file(tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    if name == "tensorboard":
        (out / name).mkdir()
    else:
        (out / name).write_text("{}\n")
    hint = "--resume" if name == "checkpoint.pt" else "another --out"
    one_line(capsys, train(out, "--iterations", "1"), 2, str(out), name, hint)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [name]
    if name != "tensorboard":
        assert (out / name).read_text() == "{}\n"


def test_new_run_refuses_folder_with_a_symlinked_run_file(tmp_path, capsys):
    target = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "final.json").symlink_to(target)
    one_line(capsys, train(out, "--iterations", "1"), 2, "final.json", "another --out")
    assert target.read_text() == "precious\n"


def test_new_run_refuses_finished_run_without_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    (out / "checkpoint.pt").unlink()
    before = snapshot(out)
    capsys.readouterr()
    one_line(capsys, train(out, "--iterations", "1"), 2, "config.json", "final.json", "metrics.jsonl", "another --out")
    assert snapshot(out) == before


def test_new_run_refuses_run_killed_before_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    for name in ("checkpoint.pt", "final.json"):  # what a run killed before its first checkpoint lacks
        (out / name).unlink()
    before = snapshot(out)
    capsys.readouterr()
    one_line(capsys, train(out, "--iterations", "1"), 2, "config.json", "metrics.jsonl", "no checkpoint")
    assert snapshot(out) == before


def test_resume_without_checkpoint_says_how_to_start_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    (out / "checkpoint.pt").unlink()
    before = snapshot(out)
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--no-progress"])
    one_line(capsys, code, 2, "before its first checkpoint", f"--config {out / 'config.json'}")
    assert snapshot(out) == before
    # the command it gives works
    new = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(new), "--no-progress"]) == 0
    assert json.loads((new / "config.json").read_text())["iterations"] == 2


def test_resume_of_an_empty_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    one_line(capsys, main(["train", "--resume", str(out), "--no-progress"]), 2, "no checkpoint.pt", "mrml train run")


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json", "final.json", "metrics.jsonl"])
def test_export_refuses_to_write_over_a_run_file_even_with_force(tmp_path, capsys, name):
    run, other = tmp_path / "run", tmp_path / "other"
    assert train(run, "--iterations", "1") == 0
    assert train(other, "--iterations", "1") == 0
    for folder in (run, other):  # its own run, and another run's folder
        before = snapshot(folder)
        capsys.readouterr()
        one_line(capsys, main(["export", str(run), "--out", str(folder / name), "--force"]), 2,
                 str(folder / name), "file of the run")
        assert snapshot(folder) == before
    assert main(["eval", str(run), "--episodes", "1"]) == 0
    assert main(["train", "--resume", str(run), "--iterations", "2", "--no-progress"]) == 0


def test_export_force_over_a_link_to_a_run_file_replaces_the_link(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--iterations", "1") == 0
    before = (run / "checkpoint.pt").read_bytes()
    link = tmp_path / "model.pt"
    link.symlink_to(run / "checkpoint.pt")
    assert main(["export", str(run), "--out", str(link), "--force"]) == 0
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not link.is_symlink() and "format" not in torch.load(link, weights_only=True)


FULL_DISK = {
    "unexpected_pos": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4246"),
    "stream_writer": RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                                  "file data/3: file write failed"),
    "enospc": OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    before = (out / "checkpoint.pt").read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise FULL_DISK[case]

    monkeypatch.setattr(ckpt.torch, "save", full)
    capsys.readouterr()
    code = main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"])
    one_line(capsys, code, 2, str(out / "checkpoint.pt"), "disk", "full")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.pt.")]


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_export_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch, case):
    run = tmp_path / "run"
    assert train(run, "--iterations", "1") == 0
    (tmp_path / "model.pt").write_bytes(b"older export")

    def full(obj, f):
        raise FULL_DISK[case]

    monkeypatch.setattr(ckpt.torch, "save", full)
    capsys.readouterr()
    code = main(["export", str(run), "--out", str(tmp_path / "model.pt"), "--force"])
    one_line(capsys, code, 2, "model.pt", "disk", "full")
    assert (tmp_path / "model.pt").read_bytes() == b"older export"
