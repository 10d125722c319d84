"""ImageNet-derived formats: miniImageNet caches and MetaOptNet pickles; tieredImageNet PNG-byte pickles and npz."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import DataError
from ..base import SPLITS
from ..safe_pickle import load_pickle
from .layouts import Layout, Request
from .npz import load_npz
from .sources import (IndexedClasses, PngBytesClasses, RawClasses, check_array, entry, name_labels, named_rows,
                      rows_by_label, select, text)

SHAPE = (84, 84, 3)
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def _rows_of_class_dict(class_dict: object, n_images: int, where: str) -> dict[str, np.ndarray]:
    if not isinstance(class_dict, dict):
        raise DataError(f"{where}: 'class_dict' is a {type(class_dict).__name__}, expected wnid -> list of rows")
    rows = {}
    for wnid, idx in class_dict.items():
        if not isinstance(idx, (list, tuple, np.ndarray)):
            raise DataError(f"{where}: 'class_dict' maps {text(wnid)} to a {type(idx).__name__}, expected a list of rows")
        idx = np.asarray(idx) if len(idx) else np.zeros(0, np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (idx.size and (idx.min() < 0 or idx.max() >= n_images)):
            raise DataError(f"{where}: 'class_dict' rows of {text(wnid)} are not indices into its {n_images} images")
        rows[text(wnid)] = idx
    return rows


def read_mini_cache(base: Path, req: Request) -> dict[str, RawClasses]:
    """learn2learn / Ren et al. `mini-imagenet-cache-{split}.pkl`: 'image_data' + 'class_dict' (wnid -> rows)."""
    out = {}
    for split in SPLITS:
        path = base / f"mini-imagenet-cache-{split}.pkl"
        doc = load_pickle(path, encoding="latin1")
        data = entry(doc, "image_data", str(path))
        check_array(data, SHAPE, str(path))
        rows = _rows_of_class_dict(entry(doc, "class_dict", str(path)), len(data), str(path))
        wanted = req.split.classes[split]
        out[split] = IndexedClasses(wanted, data, select(rows, wanted, split, str(path), req.notes), str(path))
    return out


MINI_METAOPTNET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "validation": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}


def read_mini_metaoptnet(base: Path, req: Request) -> dict[str, RawClasses]:
    """MetaOptNet / Gidaris pickles: 'data', sparse 'labels' and, when present, 'catname2label'."""
    out = {}
    for split, name in MINI_METAOPTNET_FILES.items():
        path = base / name
        doc = load_pickle(path, encoding="latin1")
        data = entry(doc, "data", str(path))
        check_array(data, SHAPE, str(path))
        rows = rows_by_label(entry(doc, "labels", str(path)), len(data), str(path))
        names = None
        if isinstance(doc, dict) and any(text(k) == "catname2label" for k in doc):
            names = {int(v): text(k) for k, v in entry(doc, "catname2label", str(path)).items()}
        wanted = req.split.classes[split]
        named = named_rows(rows, name_labels(rows, wanted, split, str(path), req.notes, names=names, strict=False))
        out[split] = IndexedClasses(wanted, data, select(named, wanted, split, str(path), req.notes), str(path))
    return out


def _specific_names(labels_doc: object, rows: dict[int, np.ndarray], n_images: int, where: str) -> dict[int, str] | None:
    """label_specific -> wnid from 'label_specific_str' (one per class, or one per image), if the file has it."""
    if not isinstance(labels_doc, dict) or not any(text(k) == "label_specific_str" for k in labels_doc):
        return None
    strs = [text(s) for s in entry(labels_doc, "label_specific_str", where)]
    if len(strs) == n_images and n_images > len(rows):
        return {v: strs[int(r[0])] for v, r in rows.items()}
    return {v: strs[v] for v in rows if 0 <= v < len(strs)}


def _tiered_split(path: Path, labels_path: Path, n_images: int, split: str, req: Request) -> list[np.ndarray]:
    """Rows of each class of `split`, from the labels pickle beside the images file `path`."""
    doc = load_pickle(labels_path, encoding="latin1")
    keys = {text(k) for k in doc} if isinstance(doc, dict) else set()
    key = "label_specific" if "label_specific" in keys or "labels" not in keys else "labels"
    rows = rows_by_label(entry(doc, key, str(labels_path)), n_images, f"{labels_path} (for {path.name})")
    names = _specific_names(doc, rows, n_images, str(labels_path))
    wanted = req.split.classes[split]
    named = named_rows(rows, name_labels(rows, wanted, split, str(labels_path), req.notes, names=names))
    return select(named, wanted, split, str(labels_path), req.notes)


def read_tiered_png(base: Path, req: Request) -> dict[str, RawClasses]:
    """Ren et al. `{split}_images_png.pkl` (PNG bytes, decoded lazily) + `{split}_labels.pkl`."""
    out = {}
    for split in SPLITS:
        path = base / f"{FILE_SPLIT[split]}_images_png.pkl"
        blobs = load_pickle(path, encoding="bytes")
        if not isinstance(blobs, (list, tuple)) or not all(isinstance(b, (np.ndarray, bytes)) for b in blobs):
            raise DataError(f"{path} should hold a list of PNG-encoded byte arrays, not a {type(blobs).__name__} of other things")
        rows = _tiered_split(path, base / f"{FILE_SPLIT[split]}_labels.pkl", len(blobs), split, req)
        out[split] = PngBytesClasses(req.split.classes[split], blobs, rows, str(path), SHAPE)
    return out


def read_tiered_npz(base: Path, req: Request) -> dict[str, RawClasses]:
    """MetaOptNet / rfs `{split}_images.npz` ('images', BGR; memory-mapped when stored) + `{split}_labels.pkl`."""
    out = {}
    for split in SPLITS:
        path = base / f"{FILE_SPLIT[split]}_images.npz"
        data = load_npz(path, "images")
        check_array(data, SHAPE, str(path))
        rows = _tiered_split(path, base / f"{FILE_SPLIT[split]}_labels.pkl", len(data), split, req)
        out[split] = IndexedClasses(req.split.classes[split], data, rows, str(path), reverse_channels=True)
    return out


MINI_CACHE = Layout(
    "learn2learn-cache", "mini-imagenet-cache-{train,validation,test}.pkl",
    tuple(f"mini-imagenet-cache-{s}.pkl" for s in SPLITS), read_mini_cache, folders=("", "mini-imagenet", "mini_imagenet"),
)
MINI_METAOPTNET = Layout(
    "metaoptnet-pickle", "miniImageNet_category_split_{train_phase_train,val,test}.pickle",
    tuple(MINI_METAOPTNET_FILES.values()), read_mini_metaoptnet, folders=("", "miniImageNet", "mini-imagenet"),
)
TIERED_PNG = Layout(
    "png-pickle", "{train,val,test}_images_png.pkl + {train,val,test}_labels.pkl",
    tuple(f"{FILE_SPLIT[s]}_{kind}.pkl" for s in SPLITS for kind in ("images_png", "labels")), read_tiered_png,
    folders=("", "tiered-imagenet", "tiered_imagenet", "tieredImageNet"),
)
TIERED_NPZ = Layout(
    "npz", "{train,val,test}_images.npz + {train,val,test}_labels.pkl",
    tuple(f"{FILE_SPLIT[s]}_{kind}" for s in SPLITS for kind in ("images.npz", "labels.pkl")), read_tiered_npz,
    folders=("", "tiered-imagenet", "tiered_imagenet", "tieredImageNet"),
)
