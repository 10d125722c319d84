"""glyphs class splits from files: the shipped split by script family (`glyphs:scripts`) and users' own files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrml.cli import main
from mrml.data import build_dataset, glyph_splits, glyphs
from mrml.data.base import SPLITS
from mrml.errors import DataError

SHIPPED = json.loads(glyph_splits.SCRIPT_SPLIT.read_text(encoding="utf-8"))
TEST_BLOCKS = {"Arabic", "Canadian Syllabics", "Tifinagh", "Mathematical Operators", "Supplemental Mathematical Operators",
               "Miscellaneous Mathematical Symbols-A", "Miscellaneous Mathematical Symbols-B", "Box Drawing"}
VALIDATION_BLOCKS = {"NKo", "Georgian", "Georgian Supplement", "Ogham", "Arrows", "Supplemental Arrows-A",
                     "Supplemental Arrows-B"}
TINY = ["--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "1", "--width", "4", "--val-episodes", "1",
        "--test-episodes", "1", "--no-progress"]


@pytest.fixture(scope="module")
def scripts():
    return build_dataset("glyphs", split_file="glyphs:scripts")


def blocks(names: list[str]) -> set[str]:
    return {glyph_splits.block_of(int(n.split()[0][2:], 16)) for n in names}


def write(path: Path, doc: dict) -> str:
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return str(path)


def one_line(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    return err


def test_shipped_script_split_is_disjoint_and_covers_every_glyphs_class_once():
    names = {glyphs.class_name(cp) for cp in glyphs.glyph_classes()}
    parts = [SHIPPED[s] for s in SPLITS]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(names)
    assert set().union(*parts) == names
    assert SHIPPED["counts"] == {s: len(SHIPPED[s]) for s in SPLITS} == {"train": 864, "validation": 216, "test": 388}


def test_shipped_script_split_holds_out_the_documented_families():
    assert blocks(SHIPPED["test"]) == TEST_BLOCKS
    assert blocks(SHIPPED["validation"]) == VALIDATION_BLOCKS
    assert not blocks(SHIPPED["train"]) & (TEST_BLOCKS | VALIDATION_BLOCKS)
    assert {"Basic Latin", "Greek and Coptic", "Cyrillic", "Hebrew"} <= blocks(SHIPPED["train"])
    assert min(len(SHIPPED[s]) for s in SPLITS) >= 20  # 20-way episodes in every split


def test_shipped_script_split_is_what_its_generator_makes():
    made = glyph_splits.script_split(glyphs.glyph_classes())
    assert {k: made[k] for k in (*SPLITS, "counts", "families", "dataset")} == \
        {k: SHIPPED[k] for k in (*SPLITS, "counts", "families", "dataset")}
    assert made["families"]["test"]["mathematical operators and symbols"] == 167
    assert "python -m mrml.data.glyph_splits" in SHIPPED["source"]


def test_build_with_the_script_split_yields_its_classes_per_split(scripts):
    for s in SPLITS:
        assert scripts.splits[s].names == SHIPPED[s]
    assert scripts.info["split_file"] == "glyphs:scripts" and scripts.info["unused_classes"] == 0
    assert scripts.info["classes"] == SHIPPED["counts"]
    default = build_dataset("glyphs")
    assert default.info["split_file"] is None
    seeded = {n: a for s in SPLITS for n, a in zip(default.splits[s].names, default.splits[s].arrays)}
    for s in SPLITS:  # the same images, regrouped
        for name, images in zip(scripts.splits[s].names[:3], scripts.splits[s].arrays[:3]):
            np.testing.assert_array_equal(images, seeded[name])


def test_own_split_file_keeps_only_its_classes(tmp_path, scripts):
    doc = {"dataset": "glyphs", "source": "test", "train": SHIPPED["train"][:5], "validation": SHIPPED["test"][:3],
           "test": ["U+0041 A", "U+05E9 ש"]}
    ds = build_dataset("glyphs", split_file=write(tmp_path / "own.json", doc))
    assert [ds.splits[s].names for s in SPLITS] == [doc["train"], doc["validation"], doc["test"]]
    assert ds.info["unused_classes"] == 1468 - 10 and ds.info["split_file"] == str(tmp_path / "own.json")


TR, VA, TE = (SHIPPED[s] for s in SPLITS)


@pytest.mark.parametrize("change, needle", [
    ({"test": [TE[0], "U+0024"]}, "names 1 test classes that glyphs does not have, e.g. 'U+0024': glyphs classes "
                                  "are named 'U+<hex code point> <character>', e.g. 'U+0021 !'"),
    ({"test": TE[:2], "validation": [TE[1], VA[0]]}, "puts 1 classes in both validation and test, e.g. " + TE[1]),
    ({"test": TE[:1]}, "has 1 test class: an episode needs at least 2 classes"),
    ({"validation": []}, "needs a non-empty list of class names under 'validation'"),
])
def test_bad_split_file_is_one_line(tmp_path, capsys, change, needle):
    doc = {"train": TR[:2], "validation": VA[:2], "test": TE[:2], **change}
    path = write(tmp_path / "bad.json", doc)
    with pytest.raises(DataError) as e:
        build_dataset("glyphs", split_file=path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    one_line(capsys, main(["train", "--dataset", "glyphs", "--split-file", path, "--iterations", "0", *TINY,
                           "--out", str(tmp_path / "run")]), needle)
    assert not (tmp_path / "run" / "config.json").exists()


def test_unknown_shipped_name_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(DataError, match="unknown shipped glyphs split 'glyphs:fonts': expected glyphs:scripts or a JSON"):
        build_dataset("glyphs", split_file="glyphs:fonts")
    with pytest.raises(DataError, match="nope.json does not exist"):
        build_dataset("glyphs", split_file=str(tmp_path / "nope.json"))


def test_train_on_the_script_split_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--split-file", "glyphs:scripts", "--iterations", "1", *TINY,
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["split_file"] == "glyphs:scripts"
    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["dataset"] == "glyphs" and first["episodes"] == 2 and 0 <= first["accuracy"] <= 1
    assert main(["eval", str(out), "--split-file", "glyphs:scripts", "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first  # the run's own split, named again
    small = write(tmp_path / "small.json", {"train": SHIPPED["train"][:3], "validation": SHIPPED["validation"][:3],
                                            "test": SHIPPED["test"][:3]})
    assert main(["eval", str(out), "--split-file", small, "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ways"] == 3
    one_line(capsys, main(["eval", str(out), "--split-file", small, "--ways", "5", "--episodes", "2"]),
             "5-way episodes need 5 classes but the test split of glyphs has 3")


def test_run_on_the_seeded_split_evaluates_on_the_script_test_families(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--iterations", "0", *TINY, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["split_file"] is None
    capsys.readouterr()
    assert main(["eval", str(out), "--split-file", "glyphs:scripts", "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2


def test_glyphs_negative_is_glyphs_with_the_opposite_polarity_on_any_split(scripts, tmp_path, capsys):
    plain, neg = build_dataset("glyphs", split_file="glyphs:scripts"), build_dataset("glyphs-negative", split_file="glyphs:scripts")
    for split in SPLITS:
        assert neg.splits[split].names == plain.splits[split].names
    idx = np.arange(3)
    x, y = plain.splits["test"].images(5, idx), neg.splits["test"].images(5, idx)
    assert np.allclose((x + y).numpy(), 1.0) and float(x.mean()) < 0.5 < float(y.mean())  # light strokes -> dark
    out = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--split-file", "glyphs:scripts", "--iterations", "0", *TINY,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "glyphs-negative", "--episodes", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dataset"] == "glyphs-negative" and got["episodes"] == 2
