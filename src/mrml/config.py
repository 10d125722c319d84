"""Every setting of a run, resolved: defaults < preset < config file < explicit options. Saved as config.json.

A run's settings are the fields of `RunConfig` (task source, model, outer loop, bookkeeping) plus
those of the `AlgoConfig` it holds (`RunConfig.algo_settings`); each is declared once, with its help
text and allowed values (`mrml.settings`), and `mrml train`'s options are made from them.
config.json stays flat: one key per setting, as it always was.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .algorithms.algo_config import AlgoConfig
from .errors import UsageError
from .presets import preset_settings
from .settings import check_setting, check_settings, default_of, field_of, setting
from .validation import BIG, EPISODES_MAX, SEED_MAX, floats, ints

#: the settings RunConfig takes from its AlgoConfig (flat in config.json, `cfg.inner_steps` reads them)
ALGO_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AlgoConfig))
COUNT_MAX = 10**5  # ways, shots, query, meta-batch
OUTER_LR_MAX = 1e37  # Adam's first step is lr / (1 - beta1): above ~3e37 that scalar overflows float32 (a traceback)
#: datasets whose inputs are feature vectors, not images: their default backbone is mlp
FEATURE_DATASETS = ("sinusoid",)


@dataclass(init=False)
class RunConfig:
    """Every setting of a `mrml train` run: the task source, model, outer loop and bookkeeping, plus the
    algorithm's settings in `algo_settings` (an `AlgoConfig`).

    Made from flat keyword settings (run and algorithm ones alike; the algorithm's go to
    `algo_settings`), read back flat too (`cfg.inner_steps` is `cfg.algo_settings.inner_steps`).
    Every value is checked when made (one-line `UsageError`); `validate()` checks again after
    fields were assigned. `to_dict()` is config.json (flat keys); `from_dict` reads it back, also
    the config.json of runs written before `algo_settings` existed.

    Args:
        algo_settings: The algorithm's settings (default: `AlgoConfig()`), copied.
        **settings: Any setting by name (`RunConfig` or `AlgoConfig` field).

    Example:
        >>> cfg = RunConfig(dataset="sinusoid", inner_steps=5, meta_batch=2)
        >>> cfg.inner_steps, cfg.algo_settings.inner_steps, cfg.algo_config().inner_steps
        (5, 5, 5)
        >>> RunConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> RunConfig.resolve({"preset": "paper"}).inner_solver  # defaults < preset < explicit
        'gd'
    """

    # task source
    dataset: str = setting("glyphs", "task source: glyphs (default, embedded), glyphs-negative (the same, dark on light), sinusoid, cifar-fs, fc100, "
                                     "mini-imagenet, tiered-imagenet, omniglot")
    data_root: str | None = setting(None, "folder holding the dataset files (on-disk benchmarks; glyphs: the folder "
                                          "of its generated cache; sinusoid takes none)")
    split_file: str | None = setting(
        None, "class split JSON to use instead of the canonical one (glyphs: also glyphs:scripts, split by script family)")
    augment: bool = setting(False, "training-set augmentation (image datasets that offer it)")
    rotations: bool = setting(False, "add 90/180/270-degree rotations of each class as new classes (image datasets)")
    image_size: int | None = setting(None, "resize images to this side length (on-disk benchmarks)",
                                     range=ints(1, 1024, hint="image side in pixels"))
    ways: int = setting(5, "classes per episode (N)", range=ints(1, COUNT_MAX))
    shots: int = setting(1, "support examples per class (K-shot)", range=ints(1, COUNT_MAX))
    query: int = setting(15, "query examples per class", range=ints(1, COUNT_MAX))
    # algorithm
    algo: str = setting("mrml", "algorithm: mrml (default) and the baselines: maml, fomaml, anil, itd-bio, imaml, "
                                "reptile, protonet, metasgd")
    algo_settings: AlgoConfig = setting(help="the algorithm's settings (flat in config.json)", cli=False,
                                        default_factory=AlgoConfig)
    # model and outer loop
    backbone: str = setting("conv4", "conv4 (default for images), resnet12 (images), or mlp (feature vectors: "
                                     "sinusoid, where it is the default)")
    width: int | None = setting(None, "backbone width (filters); default per backbone",
                                range=ints(1, 4096, hint="leave it out for the backbone's default"))
    meta_batch: int = setting(4, "tasks per outer iteration", range=ints(1, COUNT_MAX))
    iterations: int = setting(400, "outer iterations (0: untrained reference)", range=ints(0, BIG))
    outer_lr: float = setting(1e-3, "outer (Adam) learning rate", range=floats(0, OUTER_LR_MAX, open_low=True))
    optimizer: str = setting("adam", "outer optimizer: adam (default) or sgd", choices=("adam", "sgd"))
    # run
    seed: int = setting(0, "seed of the model init and the training episodes", range=ints(0, SEED_MAX))
    eval_seed: int = setting(0, "seed of the validation/test episodes", range=ints(0, SEED_MAX))
    device: str = setting("auto", "auto (default), cpu, cuda, cuda:N")
    dtype: str = setting("float32", "float32 (default) or float64", choices=("float32", "float64"))
    threads: int | None = setting(None, "CPU threads for torch (default: one per core; 1 is faster when other jobs "
                                        "share the cores)", range=ints(1, 1024))
    prefetch: int = setting(2, "meta-iterations whose training episodes a background thread prepares ahead "
                               "(0: on the training thread; the episodes are the same)",
                            range=ints(0, 64, hint="e.g. 2; 0 turns it off"))
    out: str | None = setting(None, "run folder (config.json, metrics.jsonl, checkpoint.pt, final.json)")
    preset: str | None = setting(None, "the authors' settings: cifar-fs, fc100, mini-imagenet, tiered-imagenet; "
                                       "paper: mrml in the paper's form (gd inner steps, CG) on any dataset")
    log_every: int = setting(10, "iterations between metrics.jsonl records", range=ints(1, BIG))
    val_every: int = setting(100, "iterations between validations", range=ints(1, BIG))
    val_episodes: int = setting(100, "episodes per validation", range=ints(1, EPISODES_MAX))
    test_episodes: int = setting(600, "episodes of the final meta-test", range=ints(1, EPISODES_MAX))
    checkpoint_every: int = setting(100, "iterations between checkpoints", range=ints(1, BIG))
    tensorboard: bool = setting(False, "also log to TensorBoard in OUT/tensorboard (needs the tensorboard package)")
    dist_timeout: float = setting(600.0, "seconds a distributed process waits for the others before failing "
                                         "(torchrun runs)", range=floats(0, 10**7, open_low=True, hint="seconds, e.g. 600"))

    def __init__(self, algo_settings: AlgoConfig | None = None, **settings: Any) -> None:
        algo = {k: settings.pop(k) for k in list(settings) if k in ALGO_FIELDS}
        own = {f.name: f for f in fields(RunConfig) if f.name != "algo_settings"}
        unknown = sorted(set(settings) - set(own))
        if unknown:
            raise UsageError(f"unknown setting {unknown[0]!r}")
        if "backbone" not in settings and settings.get("dataset") in FEATURE_DATASETS:
            settings["backbone"] = "mlp"  # the default for feature vectors, recorded as what runs
        for name, f in own.items():
            object.__setattr__(self, name, settings[name] if name in settings else default_of(f))
        object.__setattr__(self, "algo_settings", replace(algo_settings or AlgoConfig(), **algo))
        self.validate()

    def __getattr__(self, name: str) -> Any:  # only called for names that are not RunConfig's own
        algo = self.__dict__.get("algo_settings")
        if algo is not None and name in ALGO_FIELDS:
            return getattr(algo, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ALGO_FIELDS:
            setattr(self.algo_settings, name, value)
        else:
            object.__setattr__(self, name, value)

    def __copy__(self) -> "RunConfig":  # a copy with its own AlgoConfig (flat writes must not reach the original's)
        return replace(self)

    @classmethod
    def resolve(cls, explicit: dict[str, Any], base: dict[str, Any] | None = None) -> "RunConfig":
        """Build from explicitly given options on top of `base` (a config file's settings), the preset
        (named by either) and the defaults: defaults < preset < base < explicit.

        Args:
            explicit: Settings given on the command line (flat names).
            base: Settings read from a file (`read_config_file`), or None.

        Returns:
            The checked RunConfig; an unknown name or a bad value raises a one-line UsageError.
        """
        base = base or {}
        preset = explicit.get("preset", base.get("preset"))
        settings: dict[str, Any] = {}
        if preset:
            settings.update(preset_settings(preset, explicit.get("algo", base.get("algo", cls.algo))))
        settings.update(base)
        settings.update(explicit)
        return cls(**settings)

    def validate(self) -> None:
        """One-line UsageError for the first setting out of its declared range or choices (run and algorithm)."""
        check_settings(self)
        self.algo_settings.validate()

    def check_for_training(self) -> None:
        """One-line UsageError for combinations `mrml train` refuses besides each setting's own range:
        the exact inner solve (newton, mrml's and imaml's default) with --inner-steps 0 (no inner solve at
        all), and --amp fp16 on the CPU (fp16 autocast there is slow and not what is meant; bf16 is fine)."""
        from .algorithms import ALGORITHMS
        from .devices import pick_device

        algo = ALGORITHMS.get(self.algo)
        solvers = getattr(algo, "inner_solvers", ("gd",))
        newton = self.inner_solver == "newton" or (self.inner_solver is None and solvers[0] == "newton")
        if newton and self.inner_steps < 1:
            raise UsageError(f"--inner-steps 0 leaves {self.algo}'s exact inner solve (newton) no iteration, so the "
                             "task is never fitted: give --inner-steps >= 1 (the solve's cap), or --inner-solver gd "
                             "for no inner step")
        if self.amp == "fp16" and pick_device(self.device).type == "cpu":
            raise UsageError("--amp fp16 is for CUDA devices; on the CPU use --amp bf16 (or no --amp)")

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
        """A copy of the algorithm's settings (the algorithm resolves its None fields in its own copy)."""
        return replace(self.algo_settings)

    def to_dict(self) -> dict[str, Any]:
        """config.json: one flat key per setting, the algorithm's right after `algo` (`extra` only when set)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name != "algo_settings":
                out[f.name] = getattr(self, f.name)
                continue
            for name, value in self.algo_settings.to_dict().items():
                if name != "extra" or value:
                    out[name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """From flat settings (a run's config.json, also one written by an earlier mrml); keys that are no
        setting are left out (a newer mrml's)."""
        names = {f.name for f in fields(cls)} | set(ALGO_FIELDS)
        d = {k: v for k, v in d.items() if k in names and k != "algo_settings"}
        if d.get("dataset") in FEATURE_DATASETS and d.get("backbone") == "conv4":
            d["backbone"] = "mlp"  # runs written before the default was recorded as what ran: mlp ran
        return cls(**d)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a JSON config file (e.g. a run's own config.json) for `mrml train --config`.

    `out` in the file is dropped: a run's config.json names its own folder, which must not be trained
    into again; the new run goes to `--out` (or a fresh folder). Any key that is not a setting is a
    one-line UsageError naming it.

    Args:
        path: The JSON file: one object of settings by name.

    Returns:
        The settings, without `out`.
    """
    p = Path(path)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise UsageError(f"--config {path} gives {key!r} twice ({seen[key]!r}, then {value!r}): give it once")
            seen[key] = value
        return seen

    try:
        data = json.loads(p.read_text(), object_pairs_hook=unique)
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"--config {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"--config {path} is nested too deeply to be a config: it must hold one flat JSON object "
                         "of settings") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold one JSON object of settings (got {type(data).__name__})")
    known = {f.name for f in fields(RunConfig) if f.name != "algo_settings"} | set(ALGO_FIELDS)
    for key, value in data.items():
        if key not in known:
            raise UsageError(f"--config {path}: unknown setting {key!r} (expected the keys of a run's config.json)")
        try:  # the same types and ranges as the command line
            check_setting(field_of(AlgoConfig if key in ALGO_FIELDS else RunConfig, key), value)
        except UsageError as e:
            raise UsageError(f"--config {path}: {key}: {e}") from None
    data.pop("out", None)
    return data
