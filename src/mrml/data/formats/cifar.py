"""CIFAR-100 based formats (CIFAR-FS, FC100): python pickles, R2D2 PNG folders, MetaOptNet pickles, TADAM npz."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..base import SPLITS
from ..safe_pickle import load_pickle
from .layouts import Layout, Request
from .npz import load_npz
from .sources import (IndexedClasses, RawClasses, check_array, entry, name_labels, named_rows, read_png_folders,
                      require_classes, rows_by_label, select, stacked, text)
from .splits import canonical_json

SHAPE = (32, 32, 3)
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}  # split -> name used in file names


@lru_cache(maxsize=1)
def fine_names() -> dict[int, str]:
    """CIFAR-100 fine label index -> name (the `meta` file lists them alphabetically)."""
    groups = canonical_json("fc100")["superclass_fine_classes"].values()
    return dict(enumerate(sorted(name for group in groups for name in group)))


def read_cifar100(base: Path, req: Request) -> dict[str, RawClasses]:
    """`cifar-100-python/{train,test,meta}`: train and test pooled (600 images per class)."""
    meta = load_pickle(base / "meta", encoding="latin1")
    names = [text(n) for n in entry(meta, "fine_label_names", str(base / "meta"))]
    datas, labels = [], []
    for part in ("train", "test"):
        doc = load_pickle(base / part, encoding="bytes")
        flat = entry(doc, "data", str(base / part))
        check_array(flat, (3 * 32 * 32,), str(base / part))
        datas.append(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry(doc, "fine_labels", str(base / part))))
        if len(labels[-1]) != len(flat):
            raise DataError(f"{base / part} has {len(flat)} images but {len(labels[-1])} fine labels")
    data, label = np.concatenate(datas), np.concatenate(labels)
    if label.size and (label.min() < 0 or label.max() >= len(names)):
        raise DataError(f"{base / 'train'}: fine labels exceed the {len(names)} names of {base / 'meta'}")
    rows = {names[v]: r for v, r in rows_by_label(label, len(data), str(base / "train")).items()}
    where, classes = f"{base}/{{train,test}}", req.split.classes
    return {s: IndexedClasses(classes[s], data, select(rows, classes[s], s, where), where) for s in SPLITS}


def read_r2d2(base: Path, req: Request) -> dict[str, RawClasses]:
    """`data/<fine_name>/*.png` (+ `splits/bertinetto/*.txt`, compared with the split file)."""
    present = {p.name: p for p in (base / "data").iterdir() if p.is_dir()} if (base / "data").is_dir() else {}
    out = {}
    for split in SPLITS:
        wanted = req.split.classes[split]
        listing = base / "splits" / "bertinetto" / f"{FILE_SPLIT[split]}.txt"
        if listing.is_file():
            theirs = {line.strip() for line in listing.read_text(errors="replace").splitlines() if line.strip()}
            if theirs != set(wanted):
                req.notes.append(f"{listing} differs from the split file ({req.split.source}); the split file is used")
        require_classes(present, wanted, split, str(base / "data"))
        arrays = read_png_folders([present[n] for n in wanted], "RGB", SHAPE, f"reading {split} PNGs")
        out[split] = stacked(wanted, arrays, f"{base / 'data'}", SHAPE)
    return out


def read_labelled_files(req: Request, files: dict[str, Path], data_key: str, label_key: str, load) -> dict[str, RawClasses]:
    """One file per split holding images and sparse CIFAR-100 fine labels (or labels with no names)."""
    out = {}
    for split, path in files.items():
        doc = load(path)
        data = entry(doc, data_key, str(path))
        check_array(data, SHAPE, str(path))
        rows = rows_by_label(entry(doc, label_key, str(path)), len(data), str(path))
        wanted = req.split.classes[split]
        names = name_labels(rows, wanted, split, str(path), req.notes, names=fine_names(), strict=False)
        out[split] = IndexedClasses(wanted, data, select(named_rows(rows, names), wanted, split, str(path), req.notes),
                                    str(path))
    return out


def metaoptnet_layout(prefix: str) -> Layout:
    """`{prefix}_{train,val,test}.pickle`: dicts with 'data' (N,32,32,3) and 'labels' (Python-2 pickles)."""
    files = {s: f"{prefix}_{FILE_SPLIT[s]}.pickle" for s in SPLITS}

    def read(base: Path, req: Request) -> dict[str, RawClasses]:
        paths = {s: base / f for s, f in files.items()}
        return read_labelled_files(req, paths, "data", "labels", lambda p: load_pickle(p, encoding="latin1"))

    return Layout("metaoptnet-pickle", f"{prefix}_{{train,val,test}}.pickle", tuple(files.values()), read)


def _read_tadam(base: Path, req: Request) -> dict[str, RawClasses]:
    paths = {s: base / f"few-shot-{FILE_SPLIT[s]}.npz" for s in SPLITS}
    load = lambda p: {"features": load_npz(p, "features"), "targets": load_npz(p, "targets")}  # noqa: E731
    return read_labelled_files(req, paths, "features", "targets", load)


CIFAR100_PYTHON = Layout(
    "cifar-100-python", "cifar-100-python/{train,test,meta}", ("train", "test", "meta"), read_cifar100,
    folders=("cifar-100-python", ""),
)
R2D2 = Layout(
    "r2d2-png", "cifar100/data/<fine_name>/*.png + cifar100/splits/bertinetto/{train,val,test}.txt", ("data",),
    read_r2d2, folders=("cifar100", ""),
)
TADAM = Layout(
    "tadam-npz", "few-shot-{train,val,test}.npz", tuple(f"few-shot-{FILE_SPLIT[s]}.npz" for s in SPLITS), _read_tadam,
)
