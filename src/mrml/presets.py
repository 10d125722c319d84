"""The authors' published settings as plain data: `--preset NAME` applies them (explicit flags win).

A preset names a dataset setting; entries under "algos" override it per algorithm (the paper's
comparison: MAML, ANIL and ITD-BiO with their own inner steps and learning rates). Every preset runs
mrml in the paper's form (`inner_solver` gd, `implicit` cg, fixed l2 = 0.01, mrml's value before the
exact solver); `paper` sets only that.
"""
from __future__ import annotations

from typing import Any

from .errors import UsageError

_PAPER_32 = {  # CIFAR-FS and FC100: Conv-4-64 on 32x32
    "backbone": "conv4", "width": 64, "ways": 5, "shots": 5, "query": 5, "meta_batch": 32,
    "inner_steps": 20, "inner_lr": 0.1, "cg_steps": 20, "outer_lr": 1e-4, "test_steps": 20, "test_lr": 0.05,
    "algos": {
        "maml": {"inner_steps": 3, "inner_lr": 0.5, "outer_lr": 1e-3},
        "fomaml": {"inner_steps": 3, "inner_lr": 0.5, "outer_lr": 1e-3},
        "anil": {"inner_steps": 10, "inner_lr": 0.1, "outer_lr": 1e-4},
        "itd-bio": {"inner_steps": 20, "inner_lr": 0.1, "outer_lr": 1e-4, "l2": 1e-4},
    },
}
_PAPER_84 = {  # miniImageNet and tieredImageNet: Conv-4-32 on 84x84
    "backbone": "conv4", "width": 32, "ways": 5, "shots": 5, "query": 5, "meta_batch": 32,
    "inner_steps": 20, "inner_lr": 0.05, "cg_steps": 20, "outer_lr": 1e-3, "test_steps": 20, "test_lr": 0.05,
    "algos": {
        "maml": {"inner_steps": 3, "inner_lr": 0.5, "outer_lr": 5e-3},
        "fomaml": {"inner_steps": 3, "inner_lr": 0.5, "outer_lr": 5e-3},
        "anil": {"inner_steps": 5, "inner_lr": 0.1, "outer_lr": 1e-3},
        "itd-bio": {"inner_steps": 20, "inner_lr": 0.05, "outer_lr": 1e-4},
    },
}

#: Algorithm 1 exactly as the paper states it: K gradient steps, then N conjugate-gradient steps
_PAPER_FORM = {"inner_solver": "gd", "implicit": "cg", "learn_l2": False, "l2": 0.01}
for _preset in (_PAPER_32, _PAPER_84):
    _preset["algos"]["mrml"] = dict(_PAPER_FORM)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"algos": {"mrml": dict(_PAPER_FORM)}},  # the paper's form on whatever dataset and sizes
    "cifar-fs": {"dataset": "cifar-fs", **_PAPER_32},
    "fc100": {"dataset": "fc100", **_PAPER_32},
    "mini-imagenet": {"dataset": "mini-imagenet", **_PAPER_84},
    "tiered-imagenet": {"dataset": "tiered-imagenet", **_PAPER_84},
}


def preset_settings(name: str, algo: str) -> dict[str, Any]:
    """The settings of preset `name` for algorithm `algo` (flat dict of config fields)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: expected one of {', '.join(sorted(PRESETS))}")
    base = {k: v for k, v in PRESETS[name].items() if k != "algos"}
    base.update(PRESETS[name]["algos"].get(algo, {}))
    return base
