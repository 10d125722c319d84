"""A trained run as an object: `load_run(DIR)` -> model, learner and config; evaluation on any dataset; export.

`mrml eval RUN --dataset NAME` and `mrml export RUN --out FILE` are the command-line faces of
`LoadedRun.evaluate` and `export_weights`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import UsageError

# checkpoints written before `model_spec` existed: the run's dataset is read to find the input shape
_SPEC_KEYS = ("backbone", "kind", "input_shape", "outputs")


@dataclass
class _Shapes:
    """Stands in for a run's dataset when building its model: only kind, input shape and outputs."""

    kind: str
    input_shape: tuple[int, ...]
    outputs: int
    ways: int  # the ways the run was trained for (its head has `outputs` units then)

    def num_outputs(self, ways: int) -> int:
        return ways if self.kind == "classification" and ways != self.ways else self.outputs


def _checked_spec(spec: Any, path: Path) -> dict[str, Any]:
    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    ok = (isinstance(spec, dict) and all(k in spec for k in _SPEC_KEYS) and isinstance(spec["backbone"], str)
          and isinstance(spec["kind"], str) and isinstance(spec["input_shape"], (list, tuple))
          and len(spec["input_shape"]) > 0 and all(positive(v) for v in spec["input_shape"])
          and positive(spec["outputs"]) and (spec.get("width") is None or positive(spec["width"])))
    if not ok:
        raise UsageError(f"{path / 'checkpoint.pt'} is damaged: its model_spec is not a valid description of the model")
    return dict(spec)


def _spec(state: dict[str, Any], cfg: Any, path: Path) -> dict[str, Any]:
    """The checkpoint's model_spec, or (older checkpoints) one worked out from the run's dataset."""
    if "model_spec" in state:
        return _checked_spec(state["model_spec"], path)
    from .data.registry import build_dataset
    from .train import model_spec

    try:
        source = build_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options())
    except UsageError as e:
        raise UsageError(f"{path} was saved before checkpoints recorded the model's input shape, so its dataset is "
                         f"needed to rebuild the model, and it cannot be read: {e}") from None
    return model_spec(cfg, source)


def _refit_head(run: Any, saved: dict[str, Any], ways: int, cfg: Any, path: Path) -> dict[str, Any]:
    """The saved weights for a model built for `ways`: entries of another shape that training never
    updated (mrml's zero head) take the fresh model's values; a learned one cannot change its shape."""
    learned = {id(p) for p in run.algo.outer_parameters()}
    out = dict(saved)
    for name, p in run.model.named_parameters():
        value = saved.get(name)
        if isinstance(value, torch.Tensor) and value.shape != p.shape:
            if id(p) in learned:
                raise UsageError(f"{cfg.algo} learned {name} for {cfg.ways}-way episodes in {path}: evaluate "
                                 f"{cfg.ways}-way (--ways {cfg.ways}), or train a {ways}-way run")
            out[name] = p.detach().clone()
    return out


@dataclass
class LoadedRun:
    """A trained run: its network with the trained weights, the algorithm around it, and its settings.

    Attributes:
        model: the network (`mrml.models.FewShotNet`) holding the trained weights.
        learner: the `MetaAlgorithm` wrapping `model`, its state (e.g. a learned lambda) restored.
        config: the run's `RunConfig`.
        input_shape: (C, H, W) of the images the model takes (features for regression).
        spec: backbone, width, kind, input_shape, outputs: what `mrml.models.build_model` needs.
        iteration: the optimizer steps the weights hold.
        run_dir: the run folder it was loaded from.
        device, dtype: where and in what floating-point type the model runs.

    Example:
        >>> import io, tempfile, mrml
        >>> from mrml.config import RunConfig
        >>> from mrml.train import train
        >>> out = tempfile.mkdtemp()
        >>> settings = {"dataset": "sinusoid", "ways": 1, "iterations": 1, "width": 8, "meta_batch": 1,
        ...             "val_episodes": 1, "test_episodes": 2, "device": "cpu", "out": out}
        >>> _ = train(RunConfig.resolve(settings), progress=False, stream=io.StringIO())
        >>> run = mrml.load_run(out)
        >>> run.kind, run.learner.model is run.model, str(run.device), run.dtype
        ('regression', True, 'cpu', torch.float32)
        >>> round(run.learned_l2, 2)  # mrml learns lambda from 0.1 by default
        0.1
    """

    model: nn.Module
    learner: Any
    config: Any
    input_shape: tuple[int, ...]
    spec: dict[str, Any]
    iteration: int
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    _learners: dict[int, Any] = field(repr=False, default_factory=dict)

    @property
    def kind(self) -> str:
        """classification or regression."""
        return self.spec["kind"]

    @property
    def learned_l2(self) -> float | None:
        """The learned inner-loss strength lambda, or None when the run kept it fixed."""
        return self.learner.l2 if getattr(self.learner, "log_l2", None) is not None else None

    def learner_for(self, ways: int) -> Any:
        """The learner for `ways`-way episodes: `learner` itself for the trained ways, else one whose
        (never trained) head is sized for `ways`; a learned head cannot be resized (one-line UsageError)."""
        if ways == self.config.ways or self.kind != "classification":
            return self.learner
        if ways not in self._learners:
            state = {"model": self.model.state_dict(), "algo": self.learner.state_dict()}
            self._learners[ways] = _build(self.config, self.spec, ways, state, self.run_dir).algo
        return self._learners[ways]

    def evaluate(self, dataset: Any, split: str = "test", episodes: int = 600, ways: int | None = None,
                 shots: int | None = None, query: int | None = None, seed: int = 0,
                 progress: bool = False, adapt: str = "head", adapt_steps: int | None = None,
                 adapt_lr: float | None = None, adapt_prox: float | None = None) -> dict[str, Any]:
        """Meta-test on `episodes` seeded episodes of `dataset`'s `split` (`learner.evaluate` on each).

        Episode i is drawn from `mrml.data.episode_rng(seed, split, i)`; images of another size or
        channel count are resized (bilinear, antialiased) and converted (grey repeated, RGB averaged)
        to `input_shape`. Episode shape defaults to the run's (ways, shots, query).

        Args:
            dataset: a task source, e.g. `mrml.data.from_arrays(...)` or `mrml.build_dataset(...)`.
            split: train, validation or test.
            episodes: number of episodes T.
            ways, shots, query: episode shape (None: the run's).
            seed: episode seed.
            progress: show a progress bar.
            adapt: what adapts at test time: head (the algorithm's own adaptation), last-block, all or
                auto (`mrml.algorithms.finetune`).
            adapt_steps, adapt_lr, adapt_prox: the fine-tuning's Adam steps, step size and proximal
                strength (None: `finetune.DEFAULT_ADAPT_*`); not with head.

        Returns:
            dict with accuracy (None for regression), ci95 (1.96 sample std / sqrt(T)), loss, loss_ci95,
            episodes, split, seed, ways, shots, query, dataset (its name), adapt, adapt_steps, adapt_lr and
            adapt_prox (None with head), and under auto auto_last_block_share (the share of episodes where
            last-block was chosen).

        Raises:
            UsageError: one line for a bad setting (episode shape, seed, adapt values) or dataset.

        Example:
            >>> import io, tempfile, numpy as np, mrml
            >>> from mrml.config import RunConfig
            >>> from mrml.data import from_arrays, register
            >>> from mrml.train import train
            >>> rng = np.random.default_rng(0)
            >>> images = rng.integers(0, 256, size=(60, 16, 16), dtype=np.uint8)
            >>> mine = from_arrays(images, np.arange(60) % 12, splits=(0.5, 0.25, 0.25))
            >>> _ = register("my-images")(lambda root=None, **options: mine)
            >>> out = tempfile.mkdtemp()
            >>> _ = train(RunConfig.resolve({"dataset": "my-images", "ways": 3, "query": 2, "width": 4,
            ...     "iterations": 1, "meta_batch": 1, "val_episodes": 1, "test_episodes": 2, "device": "cpu",
            ...     "out": out}), progress=False, stream=io.StringIO())
            >>> run = mrml.load_run(out)
            >>> result = run.evaluate(mine, episodes=3, seed=1)
            >>> result == run.evaluate(mine, episodes=3, seed=1), 0 <= result["accuracy"] <= 1
            (True, True)
        """
        from .data.arrays import conform
        from .evaluate import episode_scores, summarize
        from .config import RunConfig
        from .settings import field_of
        from .validation import EVAL_RANGES, check_all
        from .algorithms.finetune import adapt_settings

        cfg = self.config
        settings = adapt_settings(adapt, adapt_steps, adapt_lr, adapt_prox)
        shape = argparse.Namespace(episodes=episodes, seed=seed, ways=cfg.ways if ways is None else ways,
                                   shots=cfg.shots if shots is None else shots,
                                   query=cfg.query if query is None else query)
        check_all(shape, EVAL_RANGES, {"episodes": "episodes", "seed": "seed"})
        for n in ("ways", "shots", "query"):  # the ranges RunConfig declares, named as this method's arguments
            field_of(RunConfig, n).metadata["range"].check(getattr(shape, n), n)
        if getattr(dataset, "kind", None) != self.kind:
            raise UsageError(f"{self.run_dir} is a {self.kind} run; dataset {getattr(dataset, 'name', dataset)!r} is "
                             f"{getattr(dataset, 'kind', 'not a task source')}: evaluate on a {self.kind} dataset")
        source = conform(dataset, self.input_shape) if self.kind == "classification" else dataset
        source.check_episode(split, shape.ways, shape.shots, shape.query)
        learner = self.learner_for(shape.ways)
        chosen: list[bool] = []
        losses, accs = episode_scores(learner, source, split, shape.ways, shape.shots, shape.query, seed,
                                      range(episodes), self.device, self.dtype, progress, adapt=settings, chosen=chosen)
        out = summarize(split, seed, losses, accs)
        out.update(ways=shape.ways, shots=shape.shots, query=shape.query, dataset=getattr(dataset, "name", None),
                   **settings.record())
        if settings.mode == "auto":
            out["auto_last_block_share"] = sum(chosen) / len(chosen)
        return out


def _build(cfg: Any, spec: dict[str, Any], ways: int, state: dict[str, Any], path: Path) -> Any:
    """The run's model and algorithm for `ways`-way episodes, trained weights and algorithm state restored."""
    from .train import build_run, restore

    shapes = _Shapes(spec["kind"], tuple(spec["input_shape"]), spec["outputs"], cfg.ways)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # build_run seeds torch: leave the caller's generators as they were
        run = build_run(replace(cfg, ways=ways, threads=None), source=shapes)  # threads: the caller decides
    saved = state["model"] if ways == cfg.ways else _refit_head(run, state["model"], ways, cfg, path)
    restore(run, {**state, "model": saved}, path, optimizer=False)
    return run


def load_run(path: str | Path, device: str | None = "cpu", *, test_steps: int | None = None,
             test_lr: float | None = None, data_root: str | Path | None = None) -> LoadedRun:
    """Load the run folder `path` (written by `mrml train` or `mrml.train.train`) as a `LoadedRun`.

    The run's dataset is not read (checkpoints record the model's input shape; older ones need it).

    Args:
        path: the run's --out folder (holds checkpoint.pt).
        device: cpu, cuda, cuda:N, auto; None: the device the run was configured with.
        test_steps, test_lr: test-time adaptation settings (None: the run's).
        data_root: where the run's own dataset is now, if it moved (read only for checkpoints older
            than the recorded input shape, and by `eval_dataset`).

    Returns:
        A `LoadedRun` with `.model`, `.learner`, `.config`, `.input_shape` and `.evaluate(dataset)`.

    Raises:
        UsageError: one line when `path` is not a run, its checkpoint is damaged, or a setting is bad.

    Example:
        >>> import io, tempfile, numpy as np, mrml
        >>> from mrml.config import RunConfig
        >>> from mrml.train import train
        >>> out = tempfile.mkdtemp()
        >>> _ = train(RunConfig.resolve({"dataset": "sinusoid", "ways": 1, "iterations": 1, "width": 8, "meta_batch": 1,
        ...     "val_episodes": 1, "test_episodes": 2, "device": "cpu", "out": out}), progress=False, stream=io.StringIO())
        >>> run = mrml.load_run(out)
        >>> run.input_shape, run.spec["backbone"], run.iteration, type(run.learner).__name__
        ((1,), 'mlp', 1, 'MRML')
        >>> mrml.load_run(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        mrml.errors.UsageError: no checkpoint.pt in ...: pass the --out folder of an mrml train run
    """
    from .checkpoint import load_checkpoint
    from .train import saved_config

    path = Path(path)
    state = load_checkpoint(path)
    cfg = saved_config(state, path)
    if device is not None:
        cfg.device = device
    if data_root is not None:
        cfg.data_root = str(data_root)
    if test_steps is not None:
        cfg.test_steps = test_steps
    if test_lr is not None:
        cfg.test_lr = test_lr
    cfg.validate()
    spec = _spec(state, cfg, path)
    run = _build(cfg, spec, cfg.ways, state, path)
    return LoadedRun(model=run.model, learner=run.algo, config=cfg, input_shape=tuple(spec["input_shape"]), spec=spec,
                     iteration=state["iteration"], run_dir=path, device=run.device, dtype=run.dtype)


# -------------------------------------------------------------------------------- evaluation datasets

# datasets whose builder takes `image_size` (and its range)
_SIZED = {"glyphs": (8, 128), "glyphs-negative": (8, 128), "cifar-fs": (1, 1024), "fc100": (1, 1024), "mini-imagenet": (1, 1024),
          "tiered-imagenet": (1, 1024), "omniglot": (1, 1024)}


def eval_dataset(run: LoadedRun, name: str | None = None, root: str | Path | None = None,
                 split_file: str | None = None) -> Any:
    """The dataset `mrml eval` tests on: the run's own (None, or its name: built with the run's options),
    or dataset `name` read at the run's image size where its builder can (else resized on the fly)."""
    from .data.registry import build_dataset

    cfg = run.config
    if name is None or name == cfg.dataset:
        opts = cfg.dataset_options()
        if split_file is not None:
            opts["split_file"] = split_file
        return build_dataset(cfg.dataset, root or cfg.data_root, **opts)
    opts: dict[str, Any] = {}
    if split_file is not None:
        opts["split_file"] = split_file
    shape = run.input_shape
    if run.kind == "classification" and len(shape) == 3 and shape[1] == shape[2] and name in _SIZED:
        low, high = _SIZED[name]
        if low <= shape[1] <= high:
            opts["image_size"] = shape[1]
    return build_dataset(name, root, **opts)


# -------------------------------------------------------------------------------- export

def export_weights(run: LoadedRun, path: str | Path, trunk_only: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the trained weights as a plain state_dict (tensors only) that `torch.load(path, weights_only=True)` reads.

    Keys are the model's (`trunk_only`: the backbone's, without the head, loadable into
    `build_model(...).backbone`). Written atomically; an existing file only with `force`, and never a
    file of a run (`checkpoint.pt`, `config.json`, `final.json`, `metrics.jsonl` beside a run's files).
    Returns what was written (file, tensors, parameters, backbone, width, input_shape, outputs, l2).
    """
    from .checkpoint import atomic_write

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder: give a file name, e.g. {path / 'model.pt'}")
    if _is_run_file(path):
        raise UsageError(f"--out {path} is a file of the run in {path.parent}: export never writes over a run's "
                         f"files (--force or not); choose another name, e.g. {path.parent / 'model.pt'}")
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path} already exists: pass --force to overwrite it, or choose another --out")
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} does not exist: create it or choose another --out")
    module = run.model.backbone if trunk_only else run.model
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    spec = run.spec
    return {"file": str(path), "tensors": len(state), "parameters": sum(p.numel() for p in module.parameters()),
            "trunk_only": trunk_only, "backbone": spec["backbone"], "width": spec.get("width"),
            "input_shape": list(spec["input_shape"]), "outputs": spec["outputs"], "l2": run.learned_l2,
            "iteration": run.iteration, "run_dir": str(run.run_dir)}


def _is_run_file(path: Path) -> bool:
    """Whether `path` names one of a run folder's files: a run file name in a folder that holds a run file
    (a run's checkpoint.pt, config.json, final.json or metrics.jsonl, existing or still to be written)."""
    from .checkpoint import RUN_FILES

    return path.name in RUN_FILES and any(os.path.lexists(path.parent / name) for name in RUN_FILES)


def cmd_export(ns: argparse.Namespace) -> int:
    from .checkpoint import strict_dumps

    info = export_weights(load_run(ns.run_dir), ns.out, ns.trunk_only, ns.force)
    if ns.json:
        print(strict_dumps(info))
        return 0
    what = "backbone (no head)" if info["trunk_only"] else "model"
    target = ".backbone" if info["trunk_only"] else ""
    print(f"wrote {info['file']}: {what} state_dict of iteration {info['iteration']}, {info['tensors']} tensors, "
          f"{info['parameters']} parameters")
    print(f"rebuild: mrml.models.build_model({info['backbone']!r}, {tuple(info['input_shape'])}, {info['outputs']}, "
          f"width={info['width']}){target}.load_state_dict(torch.load({info['file']!r}, weights_only=True))")
    if info["l2"] is not None:
        print(f"learned lambda (inner ridge strength): {info['l2']:.6g}")
    return 0


def add_commands(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    p = subparsers.add_parser("export", help="write a run's trained weights as a plain PyTorch state_dict")
    p.add_argument("run_dir", metavar="RUN", help="run folder written by `mrml train`")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (e.g. model.pt)")
    p.add_argument("--trunk-only", action="store_true", help="only the feature extractor (backbone), without the head")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    commands["export"] = cmd_export
