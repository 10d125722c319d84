"""Save and load a learner made in Python: `save_learner(learner, path)`, `load_learner(path, model)`.

The file holds plain tensors, dicts and strings only (read with `torch.load(weights_only=True)`): the
model's state_dict, the algorithm's state (`learner.state_dict()`: a learned lambda, warm starts),
its name and resolved `AlgoConfig`, the trunk's name and the built-in loss kinds. Your model's class
is not pickled: `load_learner` takes a model you built as the saved one was, checks that its tensors
match the file's (names, shapes, dtypes), and loads the weights into it. A model built by
`mrml train` is a run folder instead (`mrml.load_run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .algorithms import ALGORITHMS, AlgoConfig, MetaAlgorithm
from .algorithms.losses import TaskLoss
from .checkpoint import atomic_write, load_tagged, write_error
from .errors import UsageError

FORMAT = "mrml-learner-v1"
_PLAIN = (type(None), bool, int, float, str)


def _plain(obj: Any) -> bool:
    """Whether `obj` is plain data (None, bool, int, float, str; lists, tuples, dicts of them)."""
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (int, str)) and _plain(v) for k, v in obj.items())
    return isinstance(obj, _PLAIN)


def _moved(obj: Any, device: torch.device | str) -> Any:
    """`obj` (tensors in dicts, lists, tuples) with every tensor detached and copied to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


def _loss_kind(loss: Any) -> str | None:
    return loss.kind if isinstance(loss, TaskLoss) else None


def save_learner(learner: MetaAlgorithm, path: str | Path) -> None:
    """Write `learner` (model weights, algorithm state and settings) to the file `path`, atomically.

    Args:
        learner: any registered algorithm (`mrml.ALGORITHMS`) over any model.
        path: the file to write (replaced if it exists; its folder must exist).

    Raises:
        UsageError: one line when `path` is a folder or its folder is missing, the algorithm is not
            registered under its name, `config.extra` or a warm-start task id is not plain data, or the
            write fails (a full disk named as such).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from mrml import MRML, AlgoConfig, Episode, load_learner, save_learner
        >>> _ = torch.manual_seed(0)
        >>> net = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = MRML(net(), "classification", AlgoConfig(inner="2"))
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> _ = learner.meta_gradient([ep]); torch.optim.Adam(learner.outer_parameters(), lr=0.1).step()
        >>> path = tempfile.mkdtemp() + "/learner.pt"
        >>> save_learner(learner, path)
        >>> loaded = load_learner(path, net())            # a model built as the saved one was
        >>> loaded.evaluate(ep) == learner.evaluate(ep), loaded.l2 == learner.l2 != 0.1
        (True, True)
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give a file name, e.g. {path / 'learner.pt'}")
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} does not exist: create it or choose another file")
    cls = type(learner)
    if ALGORITHMS.get(learner.name) is not cls:
        raise UsageError(f"{cls.__name__} is not registered as {learner.name!r}, so it could not be loaded again: "
                         "decorate it with mrml.algorithms.register_algorithm")
    cfg = learner.config.to_dict()
    if not _plain(cfg):
        raise UsageError("config.extra holds values other than plain data (None, bool, int, float, str, lists and "
                         "dicts of them), which a weights-only file cannot hold: keep such options outside extra")
    state = learner.state_dict()
    if not all(_plain(k) for k in state.get("warm", {})):
        raise UsageError("warm-start task ids must be ints, strings or tuples of them to be saved: pass such task_ids "
                         "to meta_gradient")
    payload = {
        "format": FORMAT, "algorithm": learner.name, "config": cfg, "trunk": learner.split.trunk_name,
        "loss": _loss_kind(learner.loss),
        "inner_loss": "same" if learner.support_loss is learner.loss else _loss_kind(learner.support_loss),
        "model_class": type(learner.model).__name__, "model": _moved(learner.model.state_dict(), "cpu"),
        "state": _moved(state, "cpu"),
    }
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise write_error(path, e) from None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"no file {path}: pass a file written by mrml.save_learner")
    payload = load_tagged(path, "learner file", FORMAT, "; a run folder loads with mrml.load_run")
    types = {"algorithm": str, "config": dict, "model": dict, "state": dict, "model_class": str}
    for key, kind in types.items():
        if not isinstance(payload.get(key), kind):
            raise UsageError(f"{path} is damaged: {key!r} is {type(payload.get(key)).__name__ if key in payload else 'missing'}")
    for key in ("trunk", "loss", "inner_loss"):
        if not isinstance(payload.get(key), (str, type(None))):
            raise UsageError(f"{path} is damaged: {key!r} is {type(payload[key]).__name__}, not a name")
    return payload


def _check_model(path: Path, payload: dict[str, Any], model: nn.Module) -> None:
    """One-line UsageError unless `model`'s tensors are the saved ones by name, shape and dtype."""
    saved, mine = payload["model"], model.state_dict()
    problem = None
    missing = [k for k in saved if k not in mine]
    unexpected = [k for k in mine if k not in saved]
    if missing:
        problem = f"it has no tensor {missing[0]!r}"
    elif unexpected:
        problem = f"it has a tensor {unexpected[0]!r} the file lacks"
    else:
        for k, v in saved.items():
            if not isinstance(v, torch.Tensor):
                raise UsageError(f"{path} is damaged: model entry {k!r} is not a tensor")
            if v.shape != mine[k].shape or v.dtype != mine[k].dtype:
                problem = (f"{k!r} is {tuple(mine[k].shape)} {mine[k].dtype}, the file's "
                           f"{tuple(v.shape)} {v.dtype}")
                break
    if problem:
        raise UsageError(f"{path} holds a learner over a {payload['model_class']} that the model given "
                         f"({type(model).__name__}) does not match: {problem}; build the model as the saved one was "
                         "(same class, arguments and dtype)")


def load_learner(path: str | Path, model: nn.Module, loss: TaskLoss | str | Callable | None = None, *,
                 inner_loss: TaskLoss | str | Callable | None = None) -> MetaAlgorithm:
    """The learner `save_learner` wrote to `path`, over `model` (its weights loaded in place).

    Args:
        path: a file written by `save_learner`.
        model: a model built as the saved one was (same class, arguments and dtype), on the device to
            use; its tensors must match the file's by name, shape and dtype.
        loss, inner_loss: needed where the saved learner used a custom (callable) loss, which the file
            cannot hold; a built-in loss kind is restored from the file unless given.

    Returns:
        The saved algorithm (same class, settings, trunk, learned lambda and warm starts) over `model`:
        its `evaluate` gives what the saved learner's did.

    Raises:
        UsageError: one line when `path` is not such a file (or damaged), `model` does not match it,
            the algorithm is not registered, or a custom loss is needed and not given.
    """
    path = Path(path)
    payload = _read(path)
    _check_model(path, payload, model)
    name = payload["algorithm"]
    if name not in ALGORITHMS:
        raise UsageError(f"{path} holds a {name!r} learner, which is not registered here: register its class "
                         "(mrml.algorithms.register_algorithm) before loading")
    known = {f for f in AlgoConfig.__dataclass_fields__}
    unknown = sorted(set(payload["config"]) - known)
    if unknown:
        raise UsageError(f"{path} has setting {unknown[0]!r}, which this mrml does not know: load it with the mrml "
                         "that wrote it")
    if loss is None:
        loss = payload.get("loss")
        if loss is None:
            raise UsageError(f"{path} was saved with a custom loss, which the file cannot hold: pass it, "
                             "load_learner(path, model, loss=...)")
    if inner_loss is None and payload.get("inner_loss") != "same":
        inner_loss = payload.get("inner_loss")
        if inner_loss is None:
            raise UsageError(f"{path} was saved with a custom inner loss, which the file cannot hold: pass it, "
                             "load_learner(path, model, loss, inner_loss=...)")
    config = AlgoConfig(**payload["config"])
    learner = ALGORITHMS[name](model, loss, config, trunk=payload.get("trunk"), inner_loss=inner_loss)
    model.load_state_dict(payload["model"])
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    learner.load_state_dict(_moved(payload["state"], device))
    return learner


__all__ = ["FORMAT", "load_learner", "save_learner"]
