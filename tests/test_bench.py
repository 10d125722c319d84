"""`mrml bench memory`: records, targets, plot, failures recorded, bad input -> one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mrml import bench
from mrml.algorithms import ALGORITHMS
from mrml.cli import main

# tiny and single-threaded (the children do not inherit conftest's set_num_threads)
TINY = ["bench", "memory", "--width", "4", "--image-size", "16", "--ways", "3", "--shots", "2", "--query", "2",
        "--meta-batch", "1", "--repeats", "1", "--cg-steps", "3", "--device", "cpu", "--threads", "1"]
RECORD_KEYS = {"algo", "variant", "inner_steps", "peak_mb", "seconds", "device", "meter"}


def one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main([*TINY, "--algos", "mrml,floor", "--variants", "default", "--steps", "3,1",
                 "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    return code, out


def test_records_and_targets(tiny_run, capsys):
    code, out = tiny_run
    assert code == 0
    result = json.loads((out / "r.json").read_text())
    assert set(result) == {"settings", "records", "targets"}
    st = result["settings"]
    for key in ("backbone", "width", "image_size", "ways", "shots", "query", "meta_batch", "repeats", "torch", "device",
                "threads", "input_shape"):
        assert key in st, key
    assert st["width"] == 4 and st["input_shape"] == [3, 16, 16] and st["threads"] == 1 and st["steps"] == [1, 3]
    recs = result["records"]
    for r in recs:
        assert RECORD_KEYS <= set(r) and not r.get("error"), r
        assert r["peak_mb"] > 0 and r["seconds"] > 0 and r["device"] == "cpu" and r["meter"] == "dispatch"
    by = {(r["algo"], r["variant"], r["inner_steps"]): r for r in recs}
    assert ("floor", "default", None) in by
    m1, m3 = by["mrml", "default", 1]["peak_mb"], by["mrml", "default", 3]["peak_mb"]
    assert abs(m3 - m1) <= 0.02 * m1  # flat in K
    assert m1 <= 1.05 * by["floor", "default", None]["peak_mb"]
    names = [t["name"] for t in result["targets"]]
    assert any("K=3 / K=1" in n for n in names) and any("floor" in n for n in names)
    for t in result["targets"]:
        assert {"name", "value", "threshold", "pass"} <= set(t)


def test_plot_is_png(tiny_run):
    _, out = tiny_run
    png = out / "r.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    from PIL import Image

    with Image.open(png) as im:
        im.verify()


@pytest.mark.skipif("maml" not in ALGORITHMS, reason="maml not registered")
def test_maml_grows_in_process():
    """The measurement itself, in this process (the CLI runs it in children): MAML's peak grows with K, mrml's not."""
    s = bench.BenchSettings(image_size=16, width=4, ways=3, shots=2, query=2, meta_batch=1, repeats=1, cg_steps=3,
                            device="cpu")
    peak = {(a, k): bench.measure(s, a, "default", k)["peak_mb"] for a in ("maml", "mrml") for k in (1, 3)}
    assert peak["maml", 3] > 1.2 * peak["maml", 1]
    assert abs(peak["mrml", 3] - peak["mrml", 1]) <= 0.02 * peak["mrml", 1]
    assert peak["mrml", 3] < peak["maml", 3]


def test_failed_configuration_is_recorded(tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main([*TINY, "--algos", "mrml", "--variants", "default", "--steps", "1", "--timeout", "0.05", "--json", str(out)])
    assert code == 1  # measured what it could; failures recorded, not raised
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 and all("timed out" in r["error"] and r["peak_mb"] is None for r in recs)
    assert "error: timed out" in capsys.readouterr().out  # in the table


def test_measure_safely_captures_errors():
    s = bench.BenchSettings(dataset="no-such-dataset", device="cpu")
    rec = bench.measure_safely(s, "mrml", "default", 1)
    assert rec["peak_mb"] is None and rec["error"].startswith("UsageError: unknown dataset")
    assert rec["algo"] == "mrml" and rec["inner_steps"] == 1


def test_targets_and_lines():
    def r(algo, variant, k, peak, sec):
        return {"algo": algo, "variant": variant, "inner_steps": k, "peak_mb": peak, "seconds": sec}

    recs = [r("floor", "default", None, 48.7, 0.1), r("mrml", "default", 1, 48.8, 0.2), r("mrml", "default", 20, 48.8, 0.2),
            r("mrml", "default", 100, 48.8, 0.2), r("maml", "default", 20, 855.0, 3.0), r("anil", "default", 20, 48.7, 0.1),
            r("anil", "recompute", 20, 480.0, 1.0), r("mrml", "recompute", 20, 48.7, 1.0),
            r("mrml", "paper", 20, 48.0, 0.3), {**r("mrml", "all", 1, None, None), "error": "boom"}]
    ts = {t["name"]: t for t in bench.targets(recs)}
    assert len(ts) == 8  # "all" has no usable records
    assert ts["mrml seconds at K=20 / floor seconds"]["value"] == 2.0
    assert ts["mrml peak / mrml paper form (gd + CG) peak at K=20"]["value"] == pytest.approx(48.8 / 48.0, abs=1e-4)
    assert ts["mrml peak / mrml paper form (gd + CG) peak at K=20"]["pass"] is (48.8 / 48.0 <= 1.02)
    assert ts["mrml peak K=100 / K=1 (head only, flat in K)"]["pass"]
    assert ts["mrml seconds / efficient ANIL seconds at K=20"]["value"] == 2.0
    assert not ts["mrml seconds / efficient ANIL seconds at K=20"]["pass"]
    lines = bench.target_lines(list(ts.values()))
    assert all(line.startswith("target ") and line.endswith(("(PASS)", "(FAIL)")) for line in lines)


def test_plan_variants_and_skip():
    jobs = bench.plan(["mrml", "maml"], None, [1, 5], bench.parse_skip("maml:5", ["mrml", "maml"]))
    assert jobs[0] == ("floor", "default", None)
    assert {(a, v) for a, v, _ in jobs} == {("floor", "default"), ("mrml", "default"), ("mrml", "paper"), ("mrml", "recompute"), ("mrml", "last-block-newton"),
                                            ("mrml", "last-block"), ("mrml", "all"), ("mrml", "last-block-projected"),
                                            ("maml", "default"), ("maml", "last-block")}
    assert ("maml", "default", 5) not in jobs and ("maml", "default", 1) in jobs
    assert ("maml", "last-block", 5) not in jobs and ("maml", "last-block", 1) in jobs


def test_child_usage():
    assert bench.child_main([]) == 2


@pytest.mark.parametrize("args, needle", [
    (["--algos", "mrml,nope"], "unknown algorithm 'nope'"),
    (["--steps", "1,x"], "--steps expects"),
    (["--steps", "0"], "--steps expects"),
    (["--variants", "sideways"], "unknown variant"),
    (["--algos", "maml", "--variants", "recompute"], "no chosen --variants apply to maml"),
    (["--skip", "mrml:x"], "--skip expects"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--width", "two"], "invalid int"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--plot", "out.xyz"], "unknown image type"),
])
def test_bad_input_one_line(tmp_path, capsys, args, needle):
    if "--algos" in args and "maml" in args and "maml" not in ALGORITHMS:
        pytest.skip("maml not registered")
    base = [*TINY, "--steps", "1"]
    for option in (a for a in args if a.startswith("--") and a in base):  # replaced, not repeated: an option is given once
        i = base.index(option)
        base = base[:i] + base[i + 2:]
    one_line_error(capsys, main([*base, *args]), needle)


def test_unwritable_outputs(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, main([*TINY, "--steps", "1", "--json", str(blocker / "r.json")]), "cannot write --json")
    one_line_error(capsys, main([*TINY, "--steps", "1", "--plot", str(blocker / "r.png")]), "cannot write --plot")
    one_line_error(capsys, main([*TINY, "--steps", "1", "--json", str(tmp_path)]), "is a folder")
    assert not any(Path(tmp_path).glob("*.json"))


def test_bench_without_subcommand(capsys):
    one_line_error(capsys, main(["bench"]), "mrml bench memory")
