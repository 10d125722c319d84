"""Benchmark files on disk: every layout of DATA_FORMATS.md is read, checked, and refused with one clear line when wrong."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
try:
    import mrml  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import fixtures_formats as fx  # noqa: E402
from mrml.data import benchmarks  # noqa: E402
from mrml.data.base import SPLITS  # noqa: E402
from mrml.data.check import check_dataset, check_main  # noqa: E402
from mrml.data.formats import sources  # noqa: E402
from mrml.data.registry import build_dataset  # noqa: E402
from mrml.data.safe_pickle import load_pickle  # noqa: E402
from mrml.errors import DataError, UsageError  # noqa: E402


def cifar_fs_python(tmp):
    return fx.cifar100_python(tmp / "d", [c for cs in fx.CIFAR_SPLIT.values() for c in cs]), fx.CIFAR_SPLIT


def cifar_fs_r2d2(tmp):
    return fx.r2d2_pngs(tmp / "d", fx.CIFAR_SPLIT), fx.CIFAR_SPLIT


def cifar_fs_metaoptnet(tmp):
    return fx.metaoptnet_cifar(tmp / "d", "CIFAR_FS", fx.CIFAR_SPLIT), fx.CIFAR_SPLIT


def fc100_python(tmp):
    fine = fx.fc100_fine(fx.FC100_SPLIT)
    return fx.cifar100_python(tmp / "d", [c for cs in fine.values() for c in cs]), fx.FC100_SPLIT


def fc100_metaoptnet(tmp):
    return fx.metaoptnet_cifar(tmp / "d", "FC100", fx.fc100_fine(fx.FC100_SPLIT)), fx.FC100_SPLIT


def fc100_tadam(tmp):
    return fx.tadam_npz(tmp / "d", fx.fc100_fine(fx.FC100_SPLIT)), fx.FC100_SPLIT


def mini_cache_py3(tmp):
    return fx.mini_cache(tmp / "d", fx.MINI_SPLIT), fx.MINI_SPLIT


def mini_cache_bytes_keys(tmp):
    return fx.mini_cache(tmp / "d", fx.MINI_SPLIT, py2=True), fx.MINI_SPLIT


def mini_metaoptnet_named(tmp):
    return fx.mini_metaoptnet(tmp / "d", fx.MINI_SPLIT), fx.MINI_SPLIT


def mini_metaoptnet_unnamed(tmp):
    return fx.mini_metaoptnet(tmp / "d", fx.MINI_SPLIT, catnames=False), fx.MINI_SPLIT


def tiered_png(tmp):
    return fx.tiered_png(tmp / "d", fx.TIERED_SPLIT), fx.TIERED_SPLIT


def tiered_png_no_strings(tmp):
    return fx.tiered_png(tmp / "d", fx.TIERED_SPLIT, strings=False), fx.TIERED_SPLIT


def tiered_npz(tmp):
    return fx.tiered_npz(tmp / "d", fx.TIERED_SPLIT), fx.TIERED_SPLIT


def tiered_npz_compressed(tmp):
    return fx.tiered_npz(tmp / "d", fx.TIERED_SPLIT, compressed=True), fx.TIERED_SPLIT


def omniglot_py(tmp):
    return fx.omniglot(tmp / "d", fx.all_characters(fx.OMNIGLOT_SPLIT)), fx.OMNIGLOT_SPLIT


def omniglot_bare(tmp):
    return fx.omniglot(tmp / "d", fx.all_characters(fx.OMNIGLOT_SPLIT), prefix=""), fx.OMNIGLOT_SPLIT


CASES = [  # (dataset, fixture, detected format, model input shape)
    ("cifar-fs", cifar_fs_python, "cifar-100-python", (3, 32, 32)),
    ("cifar-fs", cifar_fs_r2d2, "r2d2-png", (3, 32, 32)),
    ("cifar-fs", cifar_fs_metaoptnet, "metaoptnet-pickle", (3, 32, 32)),
    ("fc100", fc100_python, "cifar-100-python", (3, 32, 32)),
    ("fc100", fc100_metaoptnet, "metaoptnet-pickle", (3, 32, 32)),
    ("fc100", fc100_tadam, "tadam-npz", (3, 32, 32)),
    ("mini-imagenet", mini_cache_py3, "learn2learn-cache", (3, 84, 84)),
    ("mini-imagenet", mini_cache_bytes_keys, "learn2learn-cache", (3, 84, 84)),
    ("mini-imagenet", mini_metaoptnet_named, "metaoptnet-pickle", (3, 84, 84)),
    ("mini-imagenet", mini_metaoptnet_unnamed, "metaoptnet-pickle", (3, 84, 84)),
    ("tiered-imagenet", tiered_png, "png-pickle", (3, 84, 84)),
    ("tiered-imagenet", tiered_png_no_strings, "png-pickle", (3, 84, 84)),
    ("tiered-imagenet", tiered_npz, "npz", (3, 84, 84)),
    ("tiered-imagenet", tiered_npz_compressed, "npz", (3, 84, 84)),
    ("omniglot", omniglot_py, "omniglot-folders", (1, 28, 28)),
    ("omniglot", omniglot_bare, "omniglot-folders", (1, 28, 28)),
]


def split_file(tmp: Path, classes: dict, **extra) -> Path:
    return fx.write_split(tmp / "split.json", classes, **extra)


def expect_one_line_error(dataset: str, root: Path, capsys, split: Path | None = None, match: str = "") -> str:
    """The DataError of check_dataset: one line, containing `match`; check_main prints it and returns 2."""
    with pytest.raises(DataError) as err:
        check_dataset(dataset, root, split)
    message = str(err.value)
    assert "\n" not in message and match in message, message
    capsys.readouterr()
    assert check_main(dataset, root, split) == 2
    out, errout = capsys.readouterr()  # stderr also holds the progress bars of what was read
    assert out == "" and errout.splitlines()[-1] == f"error: {message}"
    return message


@pytest.mark.parametrize("dataset,make,fmt,shape", CASES, ids=[c[1].__name__ for c in CASES])
def test_every_layout_reads_and_draws_episodes(tmp_path, capsys, dataset, make, fmt, shape):
    root, classes = make(tmp_path)
    split = split_file(tmp_path, classes, images_per_class=fx.PER_CLASS)
    data = build_dataset(dataset, root=root, split_file=str(split))
    assert data.info["format"] == fmt and data.info["input_shape"] == shape
    names = [set(data.splits[s].names) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    if dataset != "fc100":
        assert [data.splits[s].names for s in SPLITS] == [classes[s] for s in SPLITS]  # split file's order
    for s in SPLITS:
        ep = data.episode(s, 3, 1, 2, np.random.default_rng(0))
        assert ep.support_x.shape == (3, *shape) and ep.query_x.shape == (6, *shape)
        assert ep.support_x.dtype == torch.float32 and ep.query_x.dtype == torch.float32
        assert ep.support_y.tolist() == [0, 1, 2] and ep.query_y.tolist() == [0, 0, 1, 1, 2, 2]
    table = check_dataset(dataset, root, split)
    assert fmt in table and "ok" in table.splitlines()[-1]
    assert check_main(dataset, root, split) == 0
    assert fmt in capsys.readouterr().out


def test_images_match_what_was_written(tmp_path):
    """Pixels come back as stored: CIFAR rows reshaped to HWC, tiered npz turned from BGR to RGB, PNGs decoded."""
    root = fx.cifar100_python(tmp_path / "c", fx.CIFAR_SPLIT["train"] + fx.CIFAR_SPLIT["validation"] + fx.CIFAR_SPLIT["test"])
    data = benchmarks.build_benchmark("cifar-fs", root, split_file=split_file(tmp_path, fx.CIFAR_SPLIT))
    first = fx.images(3 * (fx.PER_CLASS - 1), (3072,), seed=len("train"))[0]
    assert np.array_equal(data.splits["train"].raw.raw(0, np.array([0]))[0], first.reshape(3, 32, 32).transpose(1, 2, 0))
    root = fx.tiered_npz(tmp_path / "t", fx.TIERED_SPLIT)
    data = benchmarks.build_benchmark("tiered-imagenet", root, split_file=split_file(tmp_path, fx.TIERED_SPLIT))
    assert isinstance(data.splits["train"].raw.data, np.memmap)  # stored npz members are memory-mapped
    rgb = fx.images(3 * fx.PER_CLASS, (84, 84, 3), seed=len("train"))
    assert np.array_equal(data.splits["train"].raw.raw(1, np.array([2, 0])), rgb[[6, 4]])
    root = fx.tiered_png(tmp_path / "p", fx.TIERED_SPLIT)
    data = benchmarks.build_benchmark("tiered-imagenet", root, split_file=split_file(tmp_path, fx.TIERED_SPLIT))
    assert np.array_equal(data.splits["train"].raw.raw(1, np.array([3])), rgb[[7]])


def test_fc100_splits_are_the_fine_classes_of_the_superclasses(tmp_path):
    root, classes = fc100_python(tmp_path)
    data = benchmarks.build_benchmark("fc100", root, split_file=split_file(tmp_path, classes))
    assert data.splits["train"].names == ["aquarium_fish", "flatfish", "ray", "shark", "trout"]
    assert data.splits["test"].num_classes == 5


def test_canonical_split_is_enforced(tmp_path, capsys):
    root, _ = cifar_fs_metaoptnet(tmp_path)
    message = expect_one_line_error("cifar-fs", root, capsys, match="holds 3 classes but the train split lists 64")
    assert "CIFAR_FS_train.pickle" in message and "e.g. aquarium_fish" in message
    root = fx.mini_cache(tmp_path / "mini", fx.MINI_SPLIT)
    message = expect_one_line_error("mini-imagenet", root, capsys, match="lacks 61 of the 64 train classes")
    assert "n01749939" in message  # a missing wnid of the Ravi split is named
    root, _ = omniglot_py(tmp_path / "o")
    expect_one_line_error("omniglot", root, capsys, match="images_background/Alphabet_of_the_Magi/character01")


def test_split_file_lacking_classes_of_the_files_is_named(tmp_path, capsys):
    root, classes = cifar_fs_python(tmp_path)
    wanted = {**classes, "test": ["baby", "whale"]}
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, wanted), match="e.g. whale")
    root, classes = tiered_png(tmp_path / "t")
    wanted = {**classes, "validation": ["n02099267", "n09999999", "n02099601"]}
    expect_one_line_error("tiered-imagenet", root, capsys, split_file(tmp_path, wanted), match="n09999999")


def test_missing_root_and_unknown_layout(tmp_path, capsys):
    expect_one_line_error("cifar-fs", tmp_path / "nowhere", capsys, match="does not exist")
    (tmp_path / "empty").mkdir()
    message = expect_one_line_error("mini-imagenet", tmp_path / "empty", capsys, match="no mini-imagenet files found")
    assert "mini-imagenet-cache-{train,validation,test}.pkl" in message and "miniImageNet_category_split" in message
    message = expect_one_line_error("tiered-imagenet", tmp_path / "empty", capsys)
    assert "_images_png.pkl" in message and "_images.npz" in message


def test_partial_layout_names_the_missing_files(tmp_path, capsys):
    root, _ = cifar_fs_metaoptnet(tmp_path)
    (root / "CIFAR_FS_val.pickle").unlink()
    expect_one_line_error("cifar-fs", root, capsys, match="lacks CIFAR_FS_val.pickle")
    (tmp_path / "o" / "images_background.zip").parent.mkdir(parents=True)
    (tmp_path / "o" / "images_background.zip").write_bytes(b"PK")
    expect_one_line_error("omniglot", tmp_path / "o", capsys, match="extract it")


def test_html_instead_of_pickle(tmp_path, capsys):
    root, classes = mini_cache_py3(tmp_path)
    (root / "mini-imagenet-cache-test.pkl").write_bytes(b"<!DOCTYPE html><html><body>Google Drive</body></html>\n")
    message = expect_one_line_error("mini-imagenet", root, capsys, split_file(tmp_path, classes), match="web page")
    assert "mini-imagenet-cache-test.pkl" in message and "download failed" in message
    root, classes = tiered_npz(tmp_path / "t")
    (root / "val_images.npz").write_bytes(b"\n  <html><head></head></html>")
    expect_one_line_error("tiered-imagenet", root, capsys, split_file(tmp_path, classes), match="val_images.npz is a web page")


def test_truncated_files(tmp_path, capsys):
    root, classes = cifar_fs_metaoptnet(tmp_path)
    path = root / "CIFAR_FS_test.pickle"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, classes), match="CIFAR_FS_test.pickle is truncated")
    root, classes = tiered_npz(tmp_path / "t")
    path = root / "test_images.npz"
    path.write_bytes(path.read_bytes()[:-200])
    expect_one_line_error("tiered-imagenet", root, capsys, split_file(tmp_path, classes), match="test_images.npz is truncated")


def test_wrong_image_shape_and_dtype(tmp_path, capsys):
    root, classes = mini_cache_py3(tmp_path)
    fx.write_pickle(root / "mini-imagenet-cache-validation.pkl",
                    {"image_data": np.zeros((12, 32, 32, 3), np.uint8), "class_dict": {c: [0] for c in classes["validation"]}},
                    py2=False)
    expect_one_line_error("mini-imagenet", root, capsys, split_file(tmp_path, classes), match="expected (N, 84, 84, 3) uint8")
    root, classes = cifar_fs_metaoptnet(tmp_path / "f")
    fx.write_pickle(root / "CIFAR_FS_train.pickle", {b"data": np.zeros((12, 32, 32, 3), np.float32), b"labels": [0] * 12})
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, classes), match="dtype float32, expected uint8")
    root, classes = cifar_fs_r2d2(tmp_path / "r")
    from PIL import Image
    Image.new("RGB", (40, 40)).save(root / "cifar100" / "data" / "bear" / "odd.png")
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, classes), match="odd.png: image has shape (40, 40, 3)")


def test_wrong_png_inside_tiered_pickle_is_found_by_check(tmp_path, capsys):
    root, classes = tiered_png(tmp_path)
    blobs = [fx.png_bytes(img) for img in fx.images(12, (84, 84, 3), seed=1)]
    blobs[8] = fx.png_bytes(np.zeros((10, 10, 3), np.uint8))  # first image of the third class
    fx.write_pickle(root / "test_images_png.pkl", blobs)
    expect_one_line_error("tiered-imagenet", root, capsys, split_file(tmp_path, classes), match="has shape (10, 10, 3)")
    blobs[8] = np.frombuffer(b"not a png at all", np.uint8)
    fx.write_pickle(root / "test_images_png.pkl", blobs)
    expect_one_line_error("tiered-imagenet", root, capsys, split_file(tmp_path, classes), match="is not a readable image")


def test_fewer_images_warn_and_empty_classes_fail(tmp_path, capsys):
    root, classes = cifar_fs_r2d2(tmp_path)
    table = check_dataset("cifar-fs", root, split_file(tmp_path, classes, images_per_class=600))
    assert "warning: train: 3 classes have fewer than 600 images (fewest 4)" in table
    for png in (root / "cifar100" / "data" / "bee").glob("*.png"):
        png.unlink()
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, classes), match="no images (e.g. bee)")


def test_bad_split_file_and_unknown_options(tmp_path, capsys):
    root, classes = cifar_fs_python(tmp_path)
    expect_one_line_error("cifar-fs", root, capsys, tmp_path / "none.json", match="does not exist")
    (tmp_path / "bad.json").write_text("{not json")
    expect_one_line_error("cifar-fs", root, capsys, tmp_path / "bad.json", match="not readable JSON")
    overlap = {**classes, "test": ["apple", "baby", "bed"]}
    expect_one_line_error("cifar-fs", root, capsys, split_file(tmp_path, overlap), match="both train and test")
    with pytest.raises(UsageError, match="unknown option.*colour, shuffle"):
        build_dataset("cifar-fs", root=root, shuffle=True, colour=1)


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root, classes = mini_cache_py3(tmp_path)
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": Payload()}))
    message = expect_one_line_error("mini-imagenet", root, capsys, split_file(tmp_path, classes),
                                    match="mini-imagenet-cache-train.pkl")
    assert f"{os.system.__module__}.system" in message and "refused" in message
    assert not marker.exists()

    class Writer:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    for proto in (0, 2, 5):
        path = tmp_path / f"evil{proto}.pkl"
        path.write_bytes(pickle.dumps([np.zeros(2), Writer()], protocol=proto))
        with pytest.raises(DataError, match=r"evil\d\.pkl: it asks for the global builtins\.exec"):
            load_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_admits_numpy_and_containers(tmp_path):
    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": [np.float32(1.5), (1, "x")], b"c": {1, 2}}
    for proto in (2, 4, 5):
        path = tmp_path / f"ok{proto}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=proto))
        got = load_pickle(path)
        assert np.array_equal(got["a"], obj["a"]) and got["b"][1] == (1, "x") and got[b"c"] == {1, 2}
    path = fx.write_pickle(tmp_path / "py2.pkl", {b"data": np.arange(4, dtype=np.uint8), b"labels": [3]})
    assert list(load_pickle(path, encoding="latin1")) == ["data", "labels"]
    assert list(load_pickle(path, encoding="bytes")) == [b"data", b"labels"]


def test_tiered_png_is_decoded_lazily(tmp_path, monkeypatch):
    calls = []
    real = sources.decode_png
    monkeypatch.setattr(sources, "decode_png", lambda blob, where: calls.append(where) or real(blob, where))
    root, classes = tiered_png(tmp_path)
    data = benchmarks.build_benchmark("tiered-imagenet", root, split_file=split_file(tmp_path, classes))
    assert calls == []
    data.episode("train", 2, 1, 2, np.random.default_rng(0))
    assert len(calls) == 2 * (1 + 2)


def test_omniglot_inverted_resized_and_rotated(tmp_path):
    root, classes = omniglot_py(tmp_path)
    split = split_file(tmp_path, classes)
    plain = benchmarks.build_benchmark("omniglot", root, split_file=split)
    x = plain.splits["train"].images(0, np.arange(4))
    assert x.shape == (4, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert x.mean() < 0.3 and x.max() > 0.9  # strokes are 1 on a 0 background
    turned = benchmarks.build_benchmark("omniglot", root, split_file=split, rotations=True)
    part = turned.splits["validation"]
    assert part.num_classes == 12 and part.names[:2] == [f"{classes['validation'][0]}/rot0", f"{classes['validation'][0]}/rot90"]
    base = plain.splits["validation"].images(1, np.array([0]))
    assert torch.equal(part.images(4 + 1, np.array([0])), torch.rot90(base, 1, dims=(2, 3)))
    assert turned.episode("test", 5, 1, 1, np.random.default_rng(0)).support_x.shape == (5, 1, 28, 28)
    small = benchmarks.build_benchmark("omniglot", root, split_file=split, image_size=20)
    assert small.splits["test"].images(0, np.array([0])).shape == (1, 1, 20, 20)


def test_augmentation_is_seeded_and_train_only(tmp_path):
    root, classes = cifar_fs_python(tmp_path)
    split = split_file(tmp_path, classes)

    def episodes(**opts):
        data = benchmarks.build_benchmark("cifar-fs", root, split_file=split, **opts)
        return [data.episode(s, 3, 1, 2, np.random.default_rng(7)) for s in ("train", "train", "test")]

    a, b, plain = episodes(augment=True, seed=1), episodes(augment=True, seed=1), episodes()
    other = episodes(augment=True, seed=2)
    assert all(torch.equal(x.support_x, y.support_x) for x, y in zip(a, b))
    assert not torch.equal(a[0].query_x, plain[0].query_x) and not torch.equal(a[0].query_x, other[0].query_x)
    assert not torch.equal(a[0].query_x, a[1].query_x)  # a fresh draw per call
    assert torch.equal(a[2].query_x, plain[2].query_x)  # test split is never augmented
    big = benchmarks.build_benchmark("cifar-fs", root, split_file=split, image_size=40)
    assert big.episode("train", 2, 1, 1, np.random.default_rng(0)).query_x.shape == (2, 3, 40, 40)


def test_normalisation_constants(tmp_path):
    root, classes = mini_cache_py3(tmp_path)
    data = benchmarks.build_benchmark("mini-imagenet", root, split_file=split_file(tmp_path, classes))
    raw = data.splits["test"].raw.raw(0, np.arange(4))
    x = data.splits["test"].images(0, np.arange(4))
    mean = torch.tensor(benchmarks.IMAGENET84_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(benchmarks.IMAGENET84_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
