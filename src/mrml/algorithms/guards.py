"""Entry checks of the learner: the episodes `meta_gradient` and `evaluate` take, and the finiteness of a
meta-step, checked with one host synchronisation per call.

`check_episodes` reads shapes and types only (no device work); the conditions that need tensor values
(a support set with fewer than 2 classes, a non-finite gradient) are 0-dim tensors gathered by
`FiniteWatch` and read once, at the end of the call. Only on failure are the episodes inspected one by
one to name the offending one.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .. import pytree
from ..data.base import Episode
from ..errors import NonFiniteError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .base import MetaAlgorithm, StepStats

_HOW = "build each task as Episode(support_x, support_y, query_x, query_y) with tensors, examples along dim 0"


_CLEAN = "clean the data, e.g. with torch.nan_to_num, or drop the task"


def _name(i: int | None, task_id: Any = None) -> str:
    """How a message names episode `i` of a list (None: the one episode given)."""
    return ("the episode" if i is None else f"episode {i}") + (f" (task id {task_id!r})" if task_id is not None else "")


def _set_size(i: int | None, ep: Episode, part: str) -> int:
    """Examples in the `part` ("support" or "query") set of episode `i`; UsageError when malformed or empty."""
    x, y = getattr(ep, f"{part}_x"), getattr(ep, f"{part}_y")
    xs = pytree.leaves(x)
    if not xs:
        raise UsageError(f"{_name(i)}: {part}_x must be a tensor or a dict/list/tuple of tensors (got "
                         f"{type(x).__name__}): {_HOW}")
    if not isinstance(y, torch.Tensor):
        raise UsageError(f"{_name(i)}: {part}_y must be a tensor (got {type(y).__name__}): use torch.as_tensor")
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in xs} | {int(y.shape[0]) if y.ndim else -1}
    if len(sizes) > 1:
        shapes = [tuple(t.shape) for t in xs] + [tuple(y.shape)]
        raise UsageError(f"{_name(i)}: the {part} inputs and targets disagree on the number of examples along "
                         f"dim 0 (shapes {shapes}): one target per example")
    n = sizes.pop()
    if n < 1:
        raise UsageError(f"{_name(i)} has an empty {part} set: every task needs at least one support and one "
                         "query example (shots >= 1, query >= 1)")
    return n


def check_episodes(episodes: Any, task_ids: Any = None, what: str = "meta_gradient") -> list[Any]:
    """Check what a learner was given (types and shapes only: no device work); return the task ids.

    Args:
        episodes: a list (or tuple) of at least one `Episode`, each with non-empty support and query sets
            whose inputs and targets agree on the number of examples.
        task_ids: None, or one id per episode.
        what: the entry point, for the message.

    Returns:
        The task ids as a list (None for each episode when not given).

    Raises:
        UsageError: one line naming the first problem and how to fix it.

    Example:
        >>> import torch
        >>> ep = Episode(torch.zeros(2, 3), torch.arange(2), torch.zeros(2, 3), torch.arange(2))
        >>> check_episodes([ep, ep], ["a", "b"])
        ['a', 'b']
        >>> try:
        ...     check_episodes([ep], ["a", "b"])
        ... except UsageError as e:
        ...     print(e)
        meta_gradient: task_ids holds 2 ids for 1 episodes: give one id per episode, in the same order (or None)
    """
    if isinstance(episodes, Episode):
        raise UsageError(f"{what} takes a list of episodes (got one Episode): pass [episode]")
    if not isinstance(episodes, (list, tuple)):
        raise UsageError(f"{what} takes a list of Episode (got {type(episodes).__name__}): {_HOW}")
    if not episodes:
        raise UsageError(f"{what} needs at least one episode (got an empty list)")
    for i, ep in enumerate(episodes):
        if not isinstance(ep, Episode):
            raise UsageError(f"{what}: item {i} of the episodes is a {type(ep).__name__}, not an Episode: {_HOW}")
        _set_size(i, ep, "support")
        _set_size(i, ep, "query")
    if task_ids is None:
        return [None] * len(episodes)
    try:
        ids = None if isinstance(task_ids, (str, bytes, dict)) else list(task_ids)
    except TypeError:
        ids = None
    if ids is None:
        raise UsageError(f"{what}: task_ids must be a list with one id per episode (got {type(task_ids).__name__})")
    if len(ids) != len(episodes):
        raise UsageError(f"{what}: task_ids holds {len(ids)} ids for {len(episodes)} episodes: give one id per "
                         "episode, in the same order (or None)")
    return ids


def _class_labels(algo: "MetaAlgorithm", ep: Episode) -> torch.Tensor | None:
    """The support labels where the inner loss is built-in classification with class indices, else None."""
    y = ep.support_y
    if algo.support_loss.kind != "classification" or y.ndim != 1 or y.dtype.is_floating_point:
        return None
    return y


def two_classes(algo: "MetaAlgorithm", ep: Episode) -> torch.Tensor | None:
    """0-dim bool tensor (no sync): the support set holds at least 2 classes; None where that does not apply."""
    y = _class_labels(algo, ep)
    return None if y is None else (y != y[0]).any()


def check_classes(algo: "MetaAlgorithm", i: int | None, ep: Episode, task_id: Any = None) -> None:
    """UsageError when episode `i` is a classification task whose support set holds fewer than 2 classes."""
    y = _class_labels(algo, ep)
    if y is not None and int(torch.unique(y).numel()) < 2:
        raise UsageError(f"{_name(i, task_id)}: its support set holds only class {int(y[0])}: a classification "
                         "task needs at least 2 classes (ways >= 2)")


def finite_flags(ep: Episode) -> dict[str, torch.Tensor]:
    """Per part of `ep` holding floating-point tensors (support_x, support_y, query_x, query_y): a 0-dim
    bool tensor, all its values finite (no sync)."""
    out = {}
    for part in ("support_x", "support_y", "query_x", "query_y"):
        flag = all_finite([t for t in pytree.leaves(getattr(ep, part)) if t.is_floating_point() or t.is_complex()])
        if flag is not None:
            out[part] = flag
    return out


def nonfinite_parts(ep: Episode) -> list[str]:
    """The parts of `ep` holding a NaN or infinite value (syncs)."""
    return [part for part, flag in finite_flags(ep).items() if not bool(flag)]


def check_input_finite(i: int | None, ep: Episode, task_id: Any = None) -> None:
    """NonFiniteError when episode `i` holds a NaN or infinite input or target."""
    bad = nonfinite_parts(ep)
    if bad:
        raise NonFiniteError(f"{_name(i, task_id)} holds NaN or infinite values in {' and '.join(bad)}: {_CLEAN}")


def check_episode(algo: "MetaAlgorithm", ep: Any, what: str = "evaluate") -> None:
    """What `evaluate` checks of its one episode: well formed (as `check_episodes`), at least 2 classes in a
    classification support set, no NaN or infinite value (one host synchronisation)."""
    if not isinstance(ep, Episode):
        raise UsageError(f"{what} takes one Episode (got {type(ep).__name__}): call it once per episode; {_HOW}")
    _set_size(None, ep, "support")
    _set_size(None, ep, "query")
    if not all_true([two_classes(algo, ep), *finite_flags(ep).values()]):
        check_classes(algo, None, ep)
        check_input_finite(None, ep)


def all_true(flags: list[torch.Tensor | None]) -> bool:
    """Whether every given bool tensor (any shape and device; None skipped) is all true: one host read,
    none for no flags."""
    fs = [f for f in flags if f is not None]
    return not fs or bool(torch.stack([f.to(fs[0].device).all() for f in fs]).all())


def all_finite(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """0-dim bool tensor (no sync): every given tensor is finite; None when none is given."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    dev = ts[0].device
    return torch.stack([torch.isfinite(t).all().to(dev) for t in ts]).all()


def sums_finite(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """0-dim bool tensor (no sync): every given tensor's sum is finite -- a screen for `all_finite` in one
    reduction per tensor (a NaN or infinity makes the sum non-finite; finite values only when the sum
    overflows, which `FiniteWatch.check` tells apart); None when none is given."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    dev = ts[0].device
    return torch.isfinite(torch.stack([t.sum().to(dev) for t in ts])).all()


class FiniteWatch:
    """Guards one `meta_gradient` call with one host synchronisation: after each task (or chunk of tasks)
    `done` records, as a tensor, whether `.grad` is still finite; `check` reads every flag at once, with the
    per-task query losses (already host floats) and the support sets' class counts (classification).

    On failure `.grad` of the outer parameters is cleared (None, as `zero_grad` leaves it) -- including what
    earlier `accumulate=True` calls had added, which the failed task mixed with -- and one line names the
    first offending episode: UsageError for a classification support set with fewer than 2 classes,
    NonFiniteError for a non-finite query loss or gradient (with its cause: non-finite inputs, or a
    divergence).
    """

    def __init__(self, algo: "MetaAlgorithm", episodes: list[Episode], ids: list[Any], accumulate: bool):
        self.algo, self.episodes, self.ids = algo, episodes, ids
        self.params = algo.outer_parameters()
        self.prior = all_finite([p.grad for p in self.params]) if accumulate else None
        classes = [two_classes(algo, ep) for ep in episodes]
        self.classes = [c for c in classes if c is not None]
        self.groups: list[tuple[list[int], torch.Tensor | None, torch.Tensor | None]] = []

    def done(self, idx: list[int], rows: torch.Tensor | None = None) -> None:
        """Tasks `idx` have added their gradient; `rows`: optional (len(idx),) bool, per task finite."""
        self.groups.append((idx, sums_finite([p.grad for p in self.params]), rows))

    def check(self, per_task: list["StepStats"]) -> None:
        """Raise (see the class) unless every loss, gradient and support set is as it should be."""
        bad_loss = [i for i, s in enumerate(per_task) if not math.isfinite(s.loss)]
        if not bad_loss and all_true([self.prior, *(g[1] for g in self.groups), *(g[2] for g in self.groups),
                                      *self.classes]):
            return
        if not bad_loss and self.screen_overflowed():
            return
        self.algo.zero_grad()
        for i, (ep, tid) in enumerate(zip(self.episodes, self.ids)):
            check_classes(self.algo, i, ep, tid)
        if self.prior is not None and not bool(self.prior):
            raise NonFiniteError(f"{self.what()}.grad held NaN or infinite values before this call "
                                 "(accumulate=True): an earlier call went wrong; .grad is cleared")
        n, (i, tasks) = len(self.episodes), self.first_bad(bad_loss)
        if i >= n:  # not reached: some flag was false
            raise NonFiniteError(f"{self.what()}a non-finite meta-gradient in one of {n} episodes; .grad is cleared")
        kind = "query loss" if i in bad_loss else "meta-gradient"
        for j in tasks:
            parts = nonfinite_parts(self.episodes[j])
            if parts:
                raise NonFiniteError(f"{self.what()}non-finite {kind} on {_name(j, self.ids[j])} of {n}: it holds "
                                     f"NaN or infinite values in {' and '.join(parts)} ({_CLEAN}); .grad is cleared")
        which = (_name(i, self.ids[i]) if len(tasks) == 1 else
                 f"episodes {tasks[0]}-{tasks[-1]} (one task-batched chunk)")
        raise NonFiniteError(f"{self.what()}non-finite {kind} on {which} of {n}, whose inputs are finite: the inner "
                             "solve or the hypergradient diverged (lower inner_lr or the outer step size, raise "
                             "l2); .grad is cleared")

    def screen_overflowed(self) -> bool:
        """Whether only the gradient screens failed and `.grad` is finite after all (a sum overflowed):
        once NaN or infinite, a gradient stays so however much is added to it."""
        if not all_true([self.prior, *(g[2] for g in self.groups), *self.classes]):
            return False
        flag = all_finite([p.grad for p in self.params])
        return flag is None or bool(flag)

    def what(self) -> str:
        return f"{self.algo.name} meta_gradient: "

    def first_bad(self, bad_loss: list[int]) -> tuple[int, list[int]]:
        """(index of the first offending task, the tasks it cannot be told apart from)."""
        first_loss = bad_loss[0] if bad_loss else len(self.episodes)
        for idx, flag, rows in self.groups:
            if idx[0] > first_loss:
                break
            if rows is not None and not bool(rows.all()):
                c = int((~rows).nonzero()[0])
                return min(idx[c], first_loss), [min(idx[c], first_loss)]
            if flag is not None and not bool(flag):
                return (first_loss, [first_loss]) if first_loss in idx else (idx[0], idx)
        return first_loss, [first_loss]


def check_dtypes(algo: "MetaAlgorithm", episodes: list[Any], what: str = "meta_gradient") -> None:
    """One line when an episode's floating-point inputs and the model's parameters mix float64 with another
    dtype (a float64 model given float32 images, or the reverse: PyTorch would fail deep inside the forward;
    autocast does not cover float64). Types only, no device work."""
    params = [p.dtype for p in algo.model.parameters() if p.is_floating_point()]
    if not params:
        return
    model_dtype = params[0]
    for i, ep in enumerate(episodes):
        for part in ("support_x", "query_x"):
            for leaf in pytree.leaves(getattr(ep, part)):
                if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype != model_dtype
                        and torch.float64 in (leaf.dtype, model_dtype)):
                    raise UsageError(f"{what}: episode {i}'s {part} is {leaf.dtype} but the model's parameters are "
                                     f"{model_dtype}: cast one to the other, e.g. episode.to(device, {model_dtype})")
