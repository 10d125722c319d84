"""The command line as a user runs it: outputs, resume, eval, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from mrml.cli import main, replace_options

FAST = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--inner-steps", "3", "--cg-steps", "3", "--val-every", "2", "--val-episodes", "3", "--test-episodes", "5",
        "--log-every", "1", "--no-progress"]


def train(out: Path, *extra: str) -> int:
    return main(["train", *replace_options(FAST, extra), "--out", str(out)])


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
    code = main(["train", *replace_options(FAST, args), "--out", str(tmp_path / "r"), "--iterations", "1"])
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


# -- command-line cases that used to run silently or end in a traceback (issues 18 and 21) --------------------
def test_ways_1_classification_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--ways", "1", "--iterations", "0"), "use --ways 2 or more")
    assert not (tmp_path / "r" / "final.json").exists()


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_sinusoid_with_an_image_backbone_is_refused(tmp_path, capsys, backbone):
    code = main(["train", "--dataset", "sinusoid", "--ways", "1", "--backbone", backbone, "--iterations", "0",
                 "--no-progress", "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, f"backbone {backbone!r} takes images (C, H, W)")


def test_sinusoid_backbone_message_names_the_backbones_it_takes(tmp_path, capsys):
    code = main(["train", "--dataset", "sinusoid", "--ways", "1", "--backbone", "conv4", "--iterations", "0",
                 "--no-progress", "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "inputs have shape (1,): use --backbone mlp")


def test_sinusoid_default_backbone_is_recorded_as_mlp(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--dataset", "sinusoid", "--ways", "1", "--shots", "2", "--query", "2", "--width", "4",
                 "--meta-batch", "1", "--iterations", "0", "--test-episodes", "1", "--val-episodes", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["backbone"] == "mlp"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["model_spec"]["backbone"] == "mlp"
    capsys.readouterr()


def test_mlp_on_images_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--backbone", "mlp", "--iterations", "0"),
                          "use --backbone conv4 or resnet12")


@pytest.mark.parametrize("args", [["--inner-steps", "0"], ["--inner-steps", "0", "--inner-solver", "newton"],
                                  ["--algo", "imaml", "--inner-steps", "0"]])
def test_inner_steps_0_with_newton_is_refused(tmp_path, capsys, args):
    assert_one_line_error(capsys, train(tmp_path / "r", "--iterations", "0", *args), "--inner-steps >= 1")


@pytest.mark.parametrize("pair", ["learn-l2", "prox"])
def test_contradicting_switches_are_refused(tmp_path, capsys, pair):
    for order in ([f"--{pair}", f"--no-{pair}"], [f"--no-{pair}", f"--{pair}"]):
        assert_one_line_error(capsys, train(tmp_path / "r", "--iterations", "0", *order), "not allowed with argument")
    assert not (tmp_path / "r").exists()


def test_resume_given_twice_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, main(["train", "--resume", str(tmp_path / "a"), "--resume", str(tmp_path / "b")]),
                          "--resume given twice")


def test_repeated_setting_is_refused(tmp_path, capsys):
    code = main(["train", *FAST, "--ways", "5", "--out", str(tmp_path / "r"), "--iterations", "0"])
    assert_one_line_error(capsys, code, "--ways given twice (3, then 5): give it once")


def test_data_root_on_sinusoid_is_refused_and_documented_for_glyphs(tmp_path, capsys):
    code = main(["train", "--dataset", "sinusoid", "--ways", "1", "--data-root", str(tmp_path), "--iterations", "0",
                 "--no-progress", "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "drop --data-root")
    from mrml.config import RunConfig
    from mrml.settings import help_of
    assert "glyphs: the folder of its generated cache" in help_of(RunConfig, "data_root")


def test_amp_fp16_on_cpu_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--amp", "fp16", "--device", "cpu", "--iterations", "0"),
                          "on the CPU use --amp bf16")


def test_outer_lr_that_overflows_adam_is_one_line(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--outer-lr", "1e38", "--iterations", "1"),
                          "--outer-lr must be > 0 and <= 1e+37")


def test_device_meta_is_one_line(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--device", "meta", "--iterations", "1"),
                          "device 'meta' cannot run mrml")


@pytest.mark.parametrize("device, needle", [
    ("meta", "cannot run mrml"), ("cpu:5", "cannot run mrml"), ("xla", "cannot run mrml"), ("bogus", "unknown device"),
    *([] if torch.cuda.is_available() else [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available")]),
    *([] if torch.backends.mps.is_available() else [("mps", "MPS (Apple GPU) is not available")]),
])
def test_device_values_are_one_line(tmp_path, capsys, device, needle):
    assert_one_line_error(capsys, train(tmp_path / "r", "--device", device, "--iterations", "0"), needle)


@pytest.mark.parametrize("dataset", ["tiny", "sinusoid"])
@pytest.mark.parametrize("backbone", ["conv4", "resnet12", "mlp"])
def test_every_dataset_backbone_pairing_runs_or_is_one_line(tmp_path, capsys, dataset, backbone):
    fits = (backbone == "mlp") == (dataset == "sinusoid")
    args = ["--dataset", dataset, "--ways", "1" if dataset == "sinusoid" else "3", "--backbone", backbone,
            "--iterations", "0", "--test-episodes", "1", "--val-episodes", "1", "--out", str(tmp_path / "r")]
    code = main(["train", *replace_options(FAST, args)])
    if fits:
        assert code == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "r" / "config.json").read_text())["backbone"] == backbone
    else:
        assert_one_line_error(capsys, code, f"backbone {backbone!r} takes")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *FAST, "--iterations", "0", "--out", str(out)]) == 0
    return out


def test_eval_refuses_a_checkpoint_whose_learned_lambda_is_inf(small_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["algo"]["log_l2"] = torch.full_like(state["algo"]["log_l2"], math.inf)
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert_one_line_error(capsys, main(["eval", str(run), "--episodes", "2"]),
                          "is damaged: the learned lambda (log_l2) is not finite (inf)")
    state["algo"]["log_l2"].fill_(0.0)
    key = next(iter(state["model"]))
    state["model"][key].view(-1)[0] = math.nan
    torch.save(state, run / "checkpoint.pt")
    assert_one_line_error(capsys, main(["eval", str(run), "--episodes", "2"]), f"is damaged: {key!r} is not finite (nan)")


@pytest.mark.parametrize("key, value, needle", [("ci95", -0.1, "expected a number >= 0"),
                                                ("accuracy", 1.5, "expected a number in [0, 1]"),
                                                ("loss", -2.0, "expected a number >= 0")])
def test_compare_refuses_impossible_figures_in_final_json(small_run, tmp_path, capsys, key, value, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    final = json.loads((run / "final.json").read_text())
    final[key] = value
    (run / "final.json").write_text(json.dumps(final))
    capsys.readouterr()
    assert_one_line_error(capsys, main(["compare", str(run)]), f"final.json: {key!r} is {value!r}, {needle}")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_data_check_refuses_fifos_named_like_the_cifar_fs_pickles(tmp_path, capsys):
    import signal

    for split in ("train", "val", "test"):
        os.mkfifo(tmp_path / f"CIFAR_FS_{split}.pickle")

    def hung(*_):
        raise AssertionError("mrml data check blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        code = main(["data", "check", "--dataset", "cifar-fs", "--root", str(tmp_path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_one_line_error(capsys, code, "is a named pipe (FIFO), not a data file")


def test_switch_given_twice_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, train(tmp_path / "r", "--learn-l2", "--learn-l2", "--iterations", "0"),
                          "--learn-l2 given twice")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_config_file_with_a_repeated_key_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"iterations": 3, "iterations": 4}')
    assert_one_line_error(capsys, train(tmp_path / "r", "--config", str(cfg)), "gives 'iterations' twice (3, then 4)")


def test_resume_of_a_run_still_going_says_it_is_in_use(tmp_path, capsys):
    """A run that holds its lock and has no checkpoint yet is running, not stopped: no advice to start it afresh."""
    from mrml.runlock import RunLock

    out = tmp_path / "live"
    out.mkdir()
    (out / "config.json").write_text("{}")
    lock = RunLock(out).acquire()
    try:
        pid = __import__("os").getpid()
        import subprocess, sys  # another process asks, as a second `mrml eval` would
        code = ("import sys; from mrml.checkpoint import load_checkpoint\n"
                "try:\n    load_checkpoint(sys.argv[1])\nexcept Exception as e:\n    print(e)")
        said = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True).stdout
        assert f"its run is still going (pid {pid})" in said and "afresh" not in said, said
    finally:
        lock.release()
    from mrml.checkpoint import load_checkpoint
    from mrml.errors import UsageError as UE
    with pytest.raises(UE, match="stopped before its first checkpoint"):  # released: now it is a stopped run
        load_checkpoint(out)
