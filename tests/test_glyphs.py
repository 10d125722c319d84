"""The embedded `glyphs` dataset: classes, splits, determinism, variation, cache and episodes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mrml.data import glyphs
from mrml.data.base import SPLITS
from mrml.data.registry import build_dataset
from mrml.errors import UsageError

SMALL = 3  # samples per class for the builds that exercise the cache (fast to generate)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    """The default dataset (seed 0, 20 samples, 28 px), generated once into a temporary MRML_CACHE."""
    cache = tmp_path_factory.mktemp("mrml-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MRML_CACHE", str(cache))
        start = time.perf_counter()
        ds = build_dataset("glyphs")
        seconds = time.perf_counter() - start
    return ds, cache, seconds


def test_at_least_1000_distinct_classes():
    cps = glyphs.glyph_classes()
    assert len(cps) >= 1000
    assert len(set(cps)) == len(cps)
    assert cps == glyphs.glyph_classes()
    blocks = {name for name, lo, hi, _ in glyphs._RANGES if any(lo <= cp <= hi for cp in cps)}
    wanted = {"Basic Latin", "Greek and Coptic", "Cyrillic", "Armenian", "Georgian", "Hebrew", "Arabic"}
    wanted |= {"Canadian Syllabics", "Mathematical Operators", "Arrows", "Box Drawing"}
    assert wanted <= blocks and len(blocks) >= 30
    assert {"A", "Ж", "ש"} <= {chr(cp) for cp in cps}


def test_full_build_counts_and_time(full):
    ds, cache, seconds = full
    info = ds.info
    assert info["num_classes"] == len(glyphs.glyph_classes()) >= 1000
    counts = [ds.splits[s].num_classes for s in SPLITS]
    assert sum(counts) == info["num_classes"]
    assert counts == [info["classes"][s] for s in SPLITS]
    share = np.array(counts) / sum(counts)
    np.testing.assert_allclose(share, [0.64, 0.16, 0.20], atol=0.01)
    assert all(ds.splits[s].count(c) == 20 for s in SPLITS for c in range(ds.splits[s].num_classes))
    assert Path(info["cache"]).parent == cache and Path(info["cache"]).is_file()
    assert not info["from_cache"]
    assert seconds < 120  # about 20 s on 2 idle cores; generous for loaded machines


def test_splits_are_disjoint_and_seeded(full):
    ds, _, _ = full
    names = [set(ds.splits[s].names) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert all(n.startswith("U+") for n in names[0])
    n = ds.info["num_classes"]
    np.testing.assert_array_equal(glyphs.split_ids(0, n), glyphs.split_ids(0, n))
    assert not np.array_equal(glyphs.split_ids(0, n), glyphs.split_ids(1, n))


def test_generate_is_deterministic_from_seed():
    a = glyphs.generate(seed=3, samples=4, max_classes=40)
    b = glyphs.generate(seed=3, samples=4, max_classes=40)
    c = glyphs.generate(seed=4, samples=4, max_classes=40)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (40, 4, 28, 28) and a[0].dtype == np.uint8
    np.testing.assert_array_equal(a[1], c[1])  # same classes ...
    assert not np.array_equal(a[0], c[0])  # ... drawn differently


def test_samples_vary_but_cluster_by_class(full):
    ds, _, _ = full
    part = ds.splits["test"]
    x = np.stack([part.arrays[c] for c in range(part.num_classes)]).astype(np.float32) / 255.0
    within = np.abs(x[:, 0] - x[:, 1]).mean(axis=(1, 2))
    assert within.min() > 0.005  # no class repeats one image
    rng = np.random.default_rng(0)
    correct = []
    for _ in range(200):  # 5-way 1-shot nearest class mean on raw pixels
        classes = rng.choice(len(x), 5, replace=False)
        order = np.stack([rng.permutation(x.shape[1]) for _ in classes])
        support = np.stack([x[c, order[i, 0]] for i, c in enumerate(classes)]).reshape(5, -1)
        query = np.stack([x[c, order[i, 1:6]] for i, c in enumerate(classes)]).reshape(25, -1)
        dist = ((query[:, None] - support[None]) ** 2).sum(-1)
        correct.append(dist.argmin(1) == np.repeat(np.arange(5), 5))
    assert np.mean(correct) > 0.35  # chance is 0.2


def test_episode_shapes(full):
    ds, _, _ = full
    ep = ds.episode("train", 5, 1, 15, np.random.default_rng(7))
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (75, 1, 28, 28)
    assert ep.support_x.dtype == torch.float32
    assert 0.0 <= float(ep.query_x.min()) and float(ep.query_x.max()) <= 1.0
    assert ep.support_y.tolist() == [0, 1, 2, 3, 4]
    assert sorted(set(ep.query_y.tolist())) == [0, 1, 2, 3, 4]
    assert ds.input_shape == (1, 28, 28)


@pytest.fixture
def few_classes(monkeypatch: pytest.MonkeyPatch) -> int:
    """Builds use 60 classes spread over the scripts, so the cache checks need not draw all of them."""
    table = glyphs._spread(list(glyphs._class_table()), 60)
    monkeypatch.setattr(glyphs, "_class_table", lambda: tuple(table))
    return len(table)


def test_cache_written_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, few_classes: int):
    monkeypatch.setenv("MRML_CACHE", str(tmp_path))
    start = time.perf_counter()
    first = glyphs.build_glyphs(samples=SMALL)
    t_first = time.perf_counter() - start
    path = tmp_path / f"glyphs-v{glyphs.VERSION}-seed0-n{SMALL}-s28.npz"
    assert path.is_file() and first.info["cache"] == str(path) and not first.info["from_cache"]
    assert not list(tmp_path.glob("*.tmp"))
    start = time.perf_counter()
    second = glyphs.build_glyphs(samples=SMALL)
    t_second = time.perf_counter() - start
    assert second.info["from_cache"] and t_second < t_first
    for s in SPLITS:
        assert first.splits[s].names == second.splits[s].names
        for a, b in zip(first.splits[s].arrays, second.splits[s].arrays):
            np.testing.assert_array_equal(a, b)


def _arrays(ds) -> np.ndarray:
    return np.concatenate([np.stack(ds.splits[s].arrays) for s in SPLITS])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape"])
def test_corrupt_cache_is_regenerated(tmp_path: Path, damage: str, few_classes: int):
    good = glyphs.build_glyphs(root=tmp_path, samples=SMALL)
    path = Path(good.info["cache"])
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        wrong = np.zeros((3, 1, 28, 28), np.uint8)  # a readable file, but not this dataset's shape
        np.savez(path, images=wrong, codepoints=np.arange(3), split=np.zeros(3), fingerprint=glyphs._fingerprint())
    again = glyphs.build_glyphs(root=tmp_path, samples=SMALL)
    assert not again.info["from_cache"]
    np.testing.assert_array_equal(_arrays(good), _arrays(again))
    assert glyphs.build_glyphs(root=tmp_path, samples=SMALL).info["from_cache"]  # rewritten, valid again


def test_unwritable_cache_dir_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, few_classes: int):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(glyphs, "_warned_cache", False)
    ds = glyphs.build_glyphs(root=blocker / "cache", samples=SMALL)
    assert ds.info["num_classes"] == few_classes and not ds.info["from_cache"]
    glyphs.build_glyphs(root=blocker / "cache", samples=SMALL)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "cache" in err


def test_options_checked():
    with pytest.raises(UsageError, match="bogus"):
        glyphs.build_glyphs(bogus=1)
    with pytest.raises(UsageError, match="samples"):
        glyphs.build_glyphs(samples=0)


def test_options_refused_not_ignored_and_registry(tmp_path: Path, few_classes: int):
    with pytest.raises(UsageError, match="augment"):
        build_dataset("glyphs", root=tmp_path, samples=SMALL, augment=True)
    with pytest.raises(UsageError, match="x.json does not exist"):  # split_file is an option (test_glyph_split.py)
        build_dataset("glyphs", root=tmp_path, samples=SMALL, split_file=str(tmp_path / "x.json"))
    ds = build_dataset("glyphs", root=tmp_path, samples=SMALL, seed=5)  # the run seed leaves the data alone
    assert ds.name == "glyphs" and ds.kind == "classification" and ds.info["num_classes"] == few_classes
    assert ds.info["seed"] == 0


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MRML_CACHE", str(tmp_path / "m"))
    assert glyphs.cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MRML_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert glyphs.cache_dir() == tmp_path / "x" / "mrml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert glyphs.cache_dir() == Path.home() / ".cache" / "mrml"
    assert glyphs.cache_dir(tmp_path) == tmp_path
