"""Tiny synthetic benchmark files in every layout of DATA_FORMATS.md, plus split files that fit them.

Python-2 pickles are imitated byte for byte where it matters: `bytes` are written as Python-2 `str`
opcodes (BINSTRING), so they load as `str` with encoding='latin1' and as `bytes` with 'bytes', and
numpy globals are named `numpy.core.*` as old numpy wrote them.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 4
CIFAR_SPLIT = {"train": ["apple", "bear", "bee"], "validation": ["beaver", "beetle", "butterfly"],
               "test": ["baby", "bed", "bicycle"]}
FC100_SPLIT = {"train": ["fish"], "validation": ["flowers"], "test": ["insects"]}  # superclasses, 5 fine each
MINI_SPLIT = {"train": ["n01532829", "n01558993", "n01704323"], "validation": ["n01855672", "n02091244", "n02114548"],
              "test": ["n01930112", "n01981276", "n02099601"]}
TIERED_SPLIT = {"train": ["n01530575", "n01531178", "n01532829"], "validation": ["n02099267", "n02099429", "n02099601"],
                "test": ["n03314780", "n07565083", "n07579787"]}
OMNIGLOT_SPLIT = {
    "train": ["images_background/Alpha/character01", "images_background/Alpha/character02", "images_background/Beta/character01"],
    "validation": ["images_background/Beta/character02", "images_background/Gamma/character01",
                   "images_background/Gamma/character02"],
    "test": ["images_evaluation/Delta/character01", "images_evaluation/Delta/character02", "images_evaluation/Eps/character01"],
}
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with `bytes` as Python-2 `str` and numpy's globals under their old `numpy.core` names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf).dump(obj)
    return buf.getvalue()


def write_pickle(path: Path, obj, py2: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(py2_dumps(obj) if py2 else pickle.dumps(obj, protocol=4))
    return path


def write_split(path: Path, classes: dict[str, list[str]], **extra) -> Path:
    path.write_text(json.dumps({**classes, **extra}))
    return path


def images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def png_bytes(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def fine_names() -> list[str]:
    from mrml.data.formats.cifar import fine_names as names
    return list(names().values())


def fc100_fine(split: dict[str, list[str]]) -> dict[str, list[str]]:
    from mrml.data.formats.splits import canonical_json
    groups = canonical_json("fc100")["superclass_fine_classes"]
    return {s: [f for sc in scs for f in groups[sc]] for s, scs in split.items()}


# ---------------------------------------------------------------- CIFAR-100 family

def cifar100_python(root: Path, classes: list[str], per_class: int = PER_CLASS) -> Path:
    """`cifar-100-python/{train,test,meta}`, split per class into train (per_class - 1) and test (1) images."""
    names = fine_names()
    folder = root / "cifar-100-python"
    for part, n in (("train", per_class - 1), ("test", 1)):
        labels = [names.index(c) for c in classes for _ in range(n)]
        data = images(len(labels), (3072,), seed=len(part))
        write_pickle(folder / part, {b"batch_label": part.encode(), b"fine_labels": labels,
                                     b"coarse_labels": [0] * len(labels), b"data": data,
                                     b"filenames": [b"x.png"] * len(labels)})
    write_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                                   b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return root


def r2d2_pngs(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS) -> Path:
    base = root / "cifar100"
    for s, classes in split.items():
        (base / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
        (base / "splits" / "bertinetto" / f"{FILE_SPLIT[s]}.txt").write_text("\n".join(classes) + "\n")
        for i, c in enumerate(classes):
            (base / "data" / c).mkdir(parents=True)
            for j, img in enumerate(images(per_class, (32, 32, 3), seed=i)):
                Image.fromarray(img).save(base / "data" / c / f"{c}_s_{j:06d}.png")
    return root


def labelled_split_files(split: dict[str, list[str]], per_class: int, shape=(32, 32, 3),
                         label_of=None) -> dict[str, tuple[np.ndarray, list[int]]]:
    names = fine_names()
    label_of = label_of or names.index
    out = {}
    for s, classes in split.items():
        labels = [label_of(c) for c in classes for _ in range(per_class)]
        out[s] = images(len(labels), shape, seed=len(s)), labels
    return out


def metaoptnet_cifar(root: Path, prefix: str, split: dict[str, list[str]], per_class: int = PER_CLASS) -> Path:
    """`{prefix}_{train,val,test}.pickle` as Python-2 pickles with sparse CIFAR-100 fine labels."""
    for s, (data, labels) in labelled_split_files(split, per_class).items():
        write_pickle(root / f"{prefix}_{FILE_SPLIT[s]}.pickle", {b"data": data, b"labels": labels})
    return root


def tadam_npz(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s, (data, labels) in labelled_split_files(split, per_class).items():
        np.savez(root / f"few-shot-{FILE_SPLIT[s]}.npz", features=data, targets=np.array(labels))
    return root


# ---------------------------------------------------------------- ImageNet family

def mini_cache(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS, py2: bool = False) -> Path:
    """learn2learn `mini-imagenet-cache-{split}.pkl`; `py2` writes bytes keys (older copies)."""
    key = (lambda k: k.encode()) if py2 else (lambda k: k)
    for s, classes in split.items():
        data = images(len(classes) * per_class, (84, 84, 3), seed=len(s))
        class_dict = {key(c): list(range(i * per_class, (i + 1) * per_class)) for i, c in enumerate(classes)}
        write_pickle(root / f"mini-imagenet-cache-{s}.pkl", {key("image_data"): data, key("class_dict"): class_dict}, py2=py2)
    return root


def mini_metaoptnet(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS, catnames: bool = True) -> Path:
    files = {"train": "miniImageNet_category_split_train_phase_train.pickle",
             "validation": "miniImageNet_category_split_val.pickle", "test": "miniImageNet_category_split_test.pickle"}
    offset = {"train": 0, "validation": 64, "test": 80}  # Gidaris' label space
    for s, classes in split.items():
        labels = [offset[s] + i for i in range(len(classes)) for _ in range(per_class)]
        doc = {b"data": images(len(labels), (84, 84, 3), seed=len(s)), b"labels": labels}
        if catnames:
            doc[b"catname2label"] = {c.encode(): offset[s] + i for i, c in enumerate(classes)}
        write_pickle(root / files[s], doc)
    for extra in ("train_phase_val", "train_phase_test"):
        write_pickle(root / f"miniImageNet_category_split_{extra}.pickle", {b"data": images(1, (84, 84, 3), 0), b"labels": [0]})
    return root


def tiered_labels(classes: list[str], per_class: int, key: str = "label_specific", strings: bool = True) -> dict:
    doc = {key.encode(): np.repeat(np.arange(len(classes)), per_class)}
    if strings:
        doc.update({b"label_specific_str": [c.encode() for c in classes], b"label_general": np.zeros(len(classes) * per_class, int),
                    b"label_general_str": [b"n00000000"]})
    return doc


def tiered_png(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS, strings: bool = True) -> Path:
    for s, classes in split.items():
        blobs = [png_bytes(img) for img in images(len(classes) * per_class, (84, 84, 3), seed=len(s))]
        write_pickle(root / f"{FILE_SPLIT[s]}_images_png.pkl", blobs)
        write_pickle(root / f"{FILE_SPLIT[s]}_labels.pkl", tiered_labels(classes, per_class, strings=strings))
    return root


def tiered_npz(root: Path, split: dict[str, list[str]], per_class: int = PER_CLASS, compressed: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    for s, classes in split.items():
        rgb = images(len(classes) * per_class, (84, 84, 3), seed=len(s))
        save(root / f"{FILE_SPLIT[s]}_images.npz", images=rgb[..., ::-1])  # stored BGR
        write_pickle(root / f"{FILE_SPLIT[s]}_labels.pkl", tiered_labels(classes, per_class, key="labels", strings=False))
    return root


# ---------------------------------------------------------------- Omniglot

def omniglot(root: Path, characters: list[str], drawers: int = PER_CLASS, prefix: str = "omniglot-py") -> Path:
    """1-bit 105x105 PNGs, black strokes (a bar) on white, one folder per character."""
    for k, char in enumerate(characters):
        folder = root / prefix / char
        folder.mkdir(parents=True)
        for d in range(drawers):
            img = np.ones((105, 105), bool)
            img[10 + k: 30 + k, 20 + d * 5: 60 + d * 5] = False
            Image.fromarray(img).convert("1").save(folder / f"{k:04d}_{d + 1:02d}.png")
    return root


def all_characters(split: dict[str, list[str]]) -> list[str]:
    return [c for s in split.values() for c in s]
