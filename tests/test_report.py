"""`mrml plot` and `mrml compare` on real (tiny) run folders: valid images, tables, one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mrml.cli import main
from mrml.report import run_labels, load_run

FAST = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--cg-steps", "3", "--val-every", "2", "--val-episodes", "3", "--test-episodes", "5",
        "--log-every", "1", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs (K=3 and K=2), one unfinished copy (no final.json) and one with no records."""
    root = tmp_path_factory.mktemp("runs")
    out = {"k3": root / "k3", "k2": root / "k2", "empty": root / "empty"}
    assert main(["train", *FAST, "--inner-steps", "3", "--iterations", "4", "--out", str(out["k3"])]) == 0
    assert main(["train", *FAST, "--inner-steps", "2", "--iterations", "4", "--out", str(out["k2"])]) == 0
    assert main(["train", *FAST, "--inner-steps", "2", "--iterations", "0", "--out", str(out["empty"])]) == 0
    out["unfinished"] = root / "unfinished"
    shutil.copytree(out["k3"], out["unfinished"])
    (out["unfinished"] / "final.json").unlink()
    return out


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("x", ["iteration", "seconds"])
@pytest.mark.parametrize("y, split", [("accuracy", None), ("loss", None), ("peak_mb", None), ("accuracy", "train"),
                                      ("loss", "train")])
def test_plot_variants_write_valid_png(runs, tmp_path, capsys, x, y, split):
    fig = tmp_path / "sub" / f"{x}-{y}.png"
    args = ["plot", str(runs["k3"]), str(runs["k2"]), "--x", x, "--y", y, "--out", str(fig)]
    if split:
        args += ["--split", split]
    assert main(args) == 0
    assert str(fig) in capsys.readouterr().out
    assert_png(fig)


def test_plot_unfinished_run_and_other_formats(runs, tmp_path):
    svg = tmp_path / "fig.svg"
    assert main(["plot", str(runs["unfinished"]), str(runs["k2"]), "--out", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml")


def test_labels_name_algorithm_and_settings(runs):
    labels = run_labels([load_run(runs["k3"]), load_run(runs["k2"])])
    assert labels == ["mrml K=3 3w1s", "mrml K=2 3w1s"]
    same = run_labels([load_run(runs["k3"]), load_run(runs["unfinished"])])
    assert same[0] != same[1] and all(lab.startswith("mrml K=3 3w1s") for lab in same)


def test_compare_table_json_markdown(runs, capsys):
    dirs = [str(runs["k3"]), str(runs["k2"]), str(runs["unfinished"])]
    assert main(["compare", *dirs]) == 0
    text = capsys.readouterr().out
    assert "mrml K=3 3w1s" in text and "mrml K=2 3w1s" in text and "k3" in text and "k2" in text
    assert "%" in text and "±" in text
    unfinished = [line for line in text.splitlines() if line.startswith("unfinished")]
    assert len(unfinished) == 1 and " - " in unfinished[0] + " "

    assert main(["compare", *dirs, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["run"]).name for r in rows] == ["k3", "k2", "unfinished"]
    for r in rows[:2]:
        final = json.loads((Path(r["run"]) / "final.json").read_text())
        assert r["finished"] and r["accuracy"] == final["accuracy"] and r["ci95"] == final["ci95"]
        assert r["seconds_per_iteration"] == final["seconds_per_iteration"] and r["peak_mb"] == final["peak_mb"] > 0
    assert not rows[2]["finished"] and rows[2]["accuracy"] is None and rows[2]["iteration"] == 4

    assert main(["compare", *dirs, "--markdown"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| run |") and md[1].startswith("|---") and len(md) == 5
    assert all(line.startswith("|") and line.endswith("|") for line in md)


def test_bad_inputs_one_line(runs, tmp_path, capsys):
    out = str(tmp_path / "f.png")
    one_line_error(capsys, main(["plot", str(tmp_path / "nope"), "--out", out]), "does not exist")
    one_line_error(capsys, main(["compare", str(tmp_path / "nope")]), "does not exist")
    (tmp_path / "plain").write_text("x")
    one_line_error(capsys, main(["compare", str(tmp_path / "plain")]), "not a folder")
    (tmp_path / "norun").mkdir()
    one_line_error(capsys, main(["plot", str(tmp_path / "norun"), "--out", out]), "no config.json")
    bad = tmp_path / "bad"
    shutil.copytree(runs["k2"], bad)
    (bad / "config.json").write_text("{not json")
    one_line_error(capsys, main(["compare", str(bad)]), "not valid JSON")
    one_line_error(capsys, main(["plot", str(runs["k2"]), str(runs["empty"]), "--out", out]), "no validation records")
    one_line_error(capsys, main(["plot", str(runs["empty"]), "--y", "peak_mb", "--out", out]), "no train records")
    one_line_error(capsys, main(["plot", str(runs["k2"]), "--y", "peak_mb", "--split", "validation", "--out", out]),
                   "use --split train")
    one_line_error(capsys, main(["plot", str(runs["k2"]), "--y", "nope", "--out", out]), "invalid choice")
    one_line_error(capsys, main(["plot", str(runs["k2"])]), "--out")
    one_line_error(capsys, main(["plot", str(runs["k2"]), "--out", str(tmp_path / "fig.nope")]), "image format")
    one_line_error(capsys, main(["compare", str(runs["k2"]), "--json", "--markdown"]), "one of --json and --markdown")
    assert not (tmp_path / "f.png").exists()
