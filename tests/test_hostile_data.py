"""Hostile files on disk: decompression bombs, undecodable PNGs, wrong class_dict values and packed archives
are one-line data errors naming the file, in `data check` and in `train` (never a traceback)."""
from __future__ import annotations

import struct
import zlib

import numpy as np

import fixtures_formats as fx
from mrml.cli import main

TRAIN = ["--iterations", "1", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "1", "--width", "4",
         "--inner-steps", "1", "--cg-steps", "1", "--val-episodes", "1", "--test-episodes", "1", "--no-progress"]


def png(side: int, idat: bytes, depth: int = 1, color: int = 0) -> bytes:
    """A PNG declaring side x side pixels with the given (possibly bogus) compressed data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def bomb_png(side: int = 60000) -> bytes:
    """A few hundred bytes declaring side x side pixels (3.6 gigapixels): PIL's decompression-bomb case."""
    return png(side, zlib.compress(b"\x00" * (side // 8 + 2) * 4))


def garbage_png() -> bytes:
    """An 84x84 RGB header over data that is not zlib: the decoder fails."""
    return png(84, b"this is not deflate data" * 20, depth=8, color=2)


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines: progress bars of what was read
    assert code == 2, err
    assert "Traceback" not in err and last.startswith("error:") and all(n in last for n in needles), err
    return last


def test_bomb_png_in_omniglot_folder(tmp_path, capsys):
    root = fx.omniglot(tmp_path / "d", fx.all_characters(fx.OMNIGLOT_SPLIT))
    split = fx.write_split(tmp_path / "split.json", fx.OMNIGLOT_SPLIT, images_per_class=fx.PER_CLASS)
    bad = root / "omniglot-py" / fx.OMNIGLOT_SPLIT["validation"][0] / "0000_99.png"
    bad.write_bytes(bomb_png())
    assert len(bomb_png()) < 48_000
    one_line_error(capsys, main(["data", "check", "--dataset", "omniglot", "--root", str(root), "--split-file", str(split)]),
                   str(bad), "decompression bomb")
    code = main(["train", "--dataset", "omniglot", "--data-root", str(root), "--split-file", str(split), *TRAIN,
                 "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, str(bad))


def test_bomb_and_garbage_png_in_tiered_pickle(tmp_path, capsys):
    root = fx.tiered_png(tmp_path / "d", fx.TIERED_SPLIT)
    split = fx.write_split(tmp_path / "split.json", fx.TIERED_SPLIT)
    blobs = [fx.png_bytes(img) for img in fx.images(12, (84, 84, 3), seed=1)]
    for blob, needle in ((np.frombuffer(bomb_png(), np.uint8), "decompression bomb"),
                         (np.frombuffer(garbage_png(), np.uint8), "not a readable image")):
        blobs[0] = blob  # first image of the first train class: read by `data check` and by every episode using it
        fx.write_pickle(root / "train_images_png.pkl", blobs)
        one_line_error(capsys, main(["data", "check", "--dataset", "tiered-imagenet", "--root", str(root),
                                     "--split-file", str(split)]), "image 0 of", needle)
    code = main(["train", "--dataset", "tiered-imagenet", "--data-root", str(root), "--split-file", str(split), *TRAIN[:8], *TRAIN[10:],
                 "--meta-batch", "4", "--out", str(tmp_path / "run")])  # TRAIN's --meta-batch 1 replaced
    one_line_error(capsys, code, "image 0 of")


def test_mini_imagenet_class_dict_of_integers(tmp_path, capsys):
    root = fx.mini_cache(tmp_path / "d", fx.MINI_SPLIT)
    path = root / "mini-imagenet-cache-train.pkl"
    data = fx.images(12, (84, 84, 3), seed=5)
    fx.write_pickle(path, {"image_data": data, "class_dict": {c: i for i, c in enumerate(fx.MINI_SPLIT["train"])}}, py2=False)
    split = fx.write_split(tmp_path / "split.json", fx.MINI_SPLIT)
    one_line_error(capsys, main(["data", "check", "--dataset", "mini-imagenet", "--root", str(root), "--split-file", str(split)]),
                   "class_dict", "expected a list of rows")


def test_packed_cifar100_archive_is_named(tmp_path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b packed")
    one_line_error(capsys, main(["data", "check", "--dataset", "cifar-fs", "--root", str(root)]),
                   "cifar-100-python.tar.gz is still packed")


def test_omniglot_image_size_too_small_for_the_backbone(tmp_path, capsys):
    root = fx.omniglot(tmp_path / "d", fx.all_characters(fx.OMNIGLOT_SPLIT))
    split = fx.write_split(tmp_path / "split.json", fx.OMNIGLOT_SPLIT, images_per_class=fx.PER_CLASS)
    for size in ("1", "3"):
        code = main(["train", "--dataset", "omniglot", "--data-root", str(root), "--split-file", str(split), *TRAIN,
                     "--image-size", size, "--out", str(tmp_path / f"run{size}")])
        one_line_error(capsys, code, "--image-size")
