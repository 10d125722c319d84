"""Every setting of a run, resolved: defaults < preset < explicit options. Saved as config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .algorithms.base import AlgoConfig
from .errors import UsageError
from .presets import preset_settings
from .validation import RUN_RANGES, check_all, check_types


@dataclass
class RunConfig:
    # task source
    dataset: str = "glyphs"
    data_root: str | None = None
    split_file: str | None = None
    augment: bool = False
    rotations: bool = False
    image_size: int | None = None
    ways: int = 5
    shots: int = 1
    query: int = 15
    # algorithm
    algo: str = "mrml"
    inner: str | None = None  # None: the algorithm's default (head for mrml)
    inner_steps: int = 20
    inner_solver: str | None = None  # gd | newton (None: the algorithm's default: newton for mrml's head)
    inner_tol: float = 1e-6
    implicit: str | None = None  # cg | direct | damped | neumann (None: direct for a linear head, else cg)
    learn_l2: bool | None = None  # None: the algorithm's default (mrml's head: learned)
    inner_lr: float = 0.1
    l2: float | None = None  # None: the algorithm's default (0.1 for mrml, the starting value when learned)
    prox: bool | None = None
    cg_steps: int = 20
    cg_tol: float = 1e-10
    warm_start: bool = False
    plain_inner: bool = False
    recompute_features: bool = False
    first_order: bool = False
    test_steps: int = 20
    test_lr: float = 0.05
    task_chunk: int = 1  # tasks per batched (vmap) pass; 1: tasks one at a time
    amp: str | None = None  # bf16 | fp16 autocast of the backbone (CG stays float32)
    compile: bool = False  # torch.compile the backbone
    # model and outer loop
    backbone: str = "conv4"
    width: int | None = None
    meta_batch: int = 4
    iterations: int = 400
    outer_lr: float = 1e-3
    optimizer: str = "adam"
    # run
    seed: int = 0
    eval_seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    out: str | None = None
    preset: str | None = None
    log_every: int = 10
    val_every: int = 100
    val_episodes: int = 100
    test_episodes: int = 600
    checkpoint_every: int = 100
    tensorboard: bool = False  # mirror metrics.jsonl to TensorBoard (OUT/tensorboard)
    dist_timeout: float = 600.0  # seconds a process waits for the others before failing

    @classmethod
    def resolve(cls, explicit: dict[str, Any]) -> "RunConfig":
        """Build from explicitly given options on top of the preset (if any) and the defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(explicit) - names
        if unknown:
            raise UsageError(f"unknown setting {sorted(unknown)[0]!r}")
        settings: dict[str, Any] = {}
        if explicit.get("preset"):
            settings.update(preset_settings(explicit["preset"], explicit.get("algo", cls.algo)))
        settings.update(explicit)
        cfg = cls(**settings)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """One-line UsageError for the first setting out of its range (table: validation.RUN_RANGES)."""
        check_types(self)
        check_all(self, RUN_RANGES)
        checks = [
            (self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd (got {self.optimizer!r})"),
            (self.amp in (None, "bf16", "fp16"), f"--amp must be bf16 or fp16 (got {self.amp!r})"),
            (self.dtype in ("float32", "float64"), f"--dtype must be float32 or float64 (got {self.dtype!r})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)

    def dataset_options(self) -> dict[str, Any]:
        """Options for the dataset builder (only those set away from their defaults, besides seed)."""
        opts: dict[str, Any] = {"seed": self.seed}
        if self.augment:
            opts["augment"] = True
        if self.rotations:
            opts["rotations"] = True
        if self.image_size is not None:
            opts["image_size"] = self.image_size
        if self.split_file is not None:
            opts["split_file"] = self.split_file
        return opts

    def algo_config(self) -> AlgoConfig:
        return AlgoConfig(
            inner=self.inner, inner_steps=self.inner_steps, inner_lr=self.inner_lr, l2=self.l2, prox=self.prox,
            inner_solver=self.inner_solver, inner_tol=self.inner_tol, implicit=self.implicit, learn_l2=self.learn_l2,
            cg_steps=self.cg_steps, cg_tol=self.cg_tol, warm_start=self.warm_start,
            recompute_features=self.recompute_features, test_steps=self.test_steps, test_lr=self.test_lr,
            first_order=self.first_order, plain_inner=self.plain_inner, task_chunk=self.task_chunk, amp=self.amp, compile=self.compile,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
