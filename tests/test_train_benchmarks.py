"""`mrml train/eval/data check` end to end on tiny files in the benchmarks' own layouts."""
from __future__ import annotations

import json

import fixtures_formats as fx
from mrml.cli import main


def test_train_cifar_fs_fixture_end_to_end(tmp_path, capsys):
    root = fx.r2d2_pngs(tmp_path / "data", fx.CIFAR_SPLIT)
    split = fx.write_split(tmp_path / "split.json", fx.CIFAR_SPLIT, images_per_class=fx.PER_CLASS)
    assert main(["data", "check", "--dataset", "cifar-fs", "--root", str(root), "--split-file", str(split)]) == 0
    out = tmp_path / "run"
    args = ["train", "--dataset", "cifar-fs", "--data-root", str(root), "--split-file", str(split), "--iterations", "2",
            "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "8", "--inner-steps", "2",
            "--cg-steps", "2", "--val-episodes", "2", "--test-episodes", "3", "--no-progress", "--out", str(out), "--augment"]
    assert main(args) == 0
    assert "meta-test accuracy" in capsys.readouterr().out
    final = json.loads((out / "final.json").read_text())
    assert final["dataset"] == "cifar-fs" and final["episodes"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data_root"] == str(root) and cfg["augment"] is True
    assert main(["eval", str(out), "--episodes", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 3


def test_train_needs_data_root_for_on_disk_benchmarks(capsys):
    assert main(["train", "--dataset", "mini-imagenet", "--iterations", "1"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_preset_prints_resolved_settings(tmp_path, capsys):
    root = fx.r2d2_pngs(tmp_path / "data", fx.CIFAR_SPLIT)
    split = fx.write_split(tmp_path / "split.json", fx.CIFAR_SPLIT, images_per_class=fx.PER_CLASS)
    args = ["train", "--preset", "cifar-fs", "--data-root", str(root), "--split-file", str(split), "--iterations", "1",
            "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "1", "--width", "4", "--inner-steps", "1",
            "--cg-steps", "1", "--val-episodes", "1", "--test-episodes", "2", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("preset cifar-fs for mrml: ")
    shown = json.loads(printed.splitlines()[0].split(": ", 1)[1])
    assert shown["outer_lr"] == 1e-4 and shown["inner_lr"] == 0.1 and shown["ways"] == 3  # flag beats preset
    assert shown["inner_solver"] == "gd" and shown["implicit"] == "cg"  # the paper's form of Algorithm 1
