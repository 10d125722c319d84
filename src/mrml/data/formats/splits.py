"""Class splits: the canonical JSON files shipped in `mrml.data/splits`, or a user's own file in the same schema.

A split file holds `train`, `validation` and `test` lists of class names in the dataset's label space
(CIFAR-100 fine names, ImageNet wnids, Omniglot character folders; FC100 lists CIFAR-100
superclasses, expanded here to their fine classes through `superclass_fine_classes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ...errors import DataError
from ..base import SPLITS

CANONICAL = {
    "cifar-fs": "cifar_fs.json",
    "fc100": "fc100.json",
    "mini-imagenet": "mini_imagenet.json",
    "tiered-imagenet": "tiered_imagenet.json",
    "omniglot": "omniglot_vinyals.json",
}


@dataclass(frozen=True)
class ClassSplit:
    """The classes of each split, in the split file's order, and what the file says about image counts."""

    dataset: str
    source: str
    classes: dict[str, list[str]]
    images_per_class: int | None = None
    images: dict[str, int] = field(default_factory=dict)  # expected images per split (tieredImageNet)
    custom: bool = False


def canonical_json(dataset: str) -> dict:
    """The parsed canonical split file of `dataset`."""
    text = (resources.files("mrml.data") / "splits" / CANONICAL[dataset]).read_text(encoding="utf-8")
    return json.loads(text)


def _read_custom(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"split file {path} is not readable JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise DataError(f"split file {path} must hold a JSON object with train, validation and test lists")
    return doc


def _class_lists(doc: dict, where: str) -> dict[str, list[str]]:
    lists = {}
    for split in SPLITS:
        names = doc.get(split)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"split file {where} needs a non-empty list of class names under {split!r}")
        lists[split] = names
    return lists


def _fc100_fine(lists: dict[str, list[str]], doc: dict, where: str) -> dict[str, list[str]]:
    fine_of = doc.get("superclass_fine_classes") or canonical_json("fc100")["superclass_fine_classes"]
    unknown = [s for names in lists.values() for s in names if s not in fine_of]
    if unknown:
        raise DataError(
            f"split file {where} lists {len(unknown)} unknown CIFAR-100 superclasses for fc100, e.g. "
            f"{', '.join(unknown[:3])}: FC100 splits name superclasses (e.g. {', '.join(list(fine_of)[:2])})"
        )
    return {split: [f for s in names for f in fine_of[s]] for split, names in lists.items()}


def load_split(dataset: str, split_file: str | Path | None = None) -> ClassSplit:
    """The class split of `dataset`: the canonical one, or `split_file` (same schema) when given."""
    if split_file is None:
        doc, where = canonical_json(dataset), f"canonical {CANONICAL[dataset]}"
    else:
        doc, where = _read_custom(Path(split_file)), str(split_file)
    classes = _class_lists(doc, where)
    if dataset == "fc100":
        classes = _fc100_fine(classes, doc, where)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            both = sorted(set(classes[a]) & set(classes[b]))
            if both:
                raise DataError(
                    f"split file {where} puts {len(both)} classes in both {a} and {b}, e.g. {', '.join(both[:3])}: "
                    "splits must be class-disjoint"
                )
        if len(set(classes[a])) != len(classes[a]):
            raise DataError(f"split file {where} lists a class twice in {a}")
    per_class = doc.get("images_per_class")
    images = doc.get("images") if isinstance(doc.get("images"), dict) else {}
    return ClassSplit(
        dataset=dataset,
        source=where,
        classes=classes,
        images_per_class=per_class if isinstance(per_class, int) else None,
        images={k: v for k, v in images.items() if k in SPLITS and isinstance(v, int)},
        custom=split_file is not None,
    )
