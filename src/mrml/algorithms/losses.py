"""Task losses: the built-in kinds (cross-entropy with accuracy for classification, mean squared
error for regression) and any callable `loss(pred, target) -> scalar tensor` (`CallableLoss`).

`make_loss` turns what a user passes as `loss` into one of them; a misspelt kind is a UsageError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError

LOSS_KINDS = ("classification", "regression")
_EXPECTED = "'classification', 'regression', a TaskLoss, or a callable loss(pred, target) -> scalar tensor"


def class_accuracies(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Fraction of argmax(pred) == target over the last batch dimension (one value per task when tasks
    are stacked in front), when pred holds logits (..., n, C) and target integer labels (..., n); else None."""
    if (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool
            or pred.dim() != target.dim() + 1 or pred.shape[:-1] != target.shape):
        return None
    return (pred.argmax(-1) == target).float().mean(-1)


@dataclass(frozen=True)
class TaskLoss:
    """A built-in loss: `kind` is "classification" (cross-entropy) or "regression" (mean squared error)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise UsageError(f"unknown loss {self.kind!r}: expected {_EXPECTED}")

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return F.cross_entropy(pred, target)
        return F.mse_loss(pred.reshape(target.shape), target)

    def accuracy(self, pred: torch.Tensor, target: torch.Tensor) -> float | None:
        acc = self.accuracies(pred, target)
        return None if acc is None else float(acc)

    def accuracies(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Fraction correct over the last batch dimension (one value per task when tasks are stacked
        in front); None for regression."""
        return class_accuracies(pred, target) if self.kind == "classification" else None


@dataclass(frozen=True)
class CallableLoss:
    """A user's `fn(pred, target) -> scalar tensor`; accuracy where pred are logits and target labels.
    Its `kind` is "custom": the closed forms of a linear head do not apply to it."""

    fn: Callable[[Any, Any], torch.Tensor]
    kind: str = "custom"

    def __call__(self, pred: Any, target: Any) -> torch.Tensor:
        out = self.fn(pred, target)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"the loss must return a scalar tensor (got {got}): reduce it, e.g. with .mean()")
        return out

    def accuracy(self, pred: Any, target: Any) -> float | None:
        acc = self.accuracies(pred, target)
        return None if acc is None else float(acc)

    def accuracies(self, pred: Any, target: Any) -> torch.Tensor | None:
        if not (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor)):
            return None
        return class_accuracies(pred, target)


Loss = TaskLoss | CallableLoss


def make_loss(loss: Any, what: str = "loss") -> Loss:
    """`loss` as a task loss: a kind name, a TaskLoss/CallableLoss (kept), or a callable (wrapped).

    Example:
        >>> import torch
        >>> make_loss("regression").kind
        'regression'
        >>> ce = make_loss(lambda pred, target: torch.nn.functional.cross_entropy(pred, target))
        >>> ce.kind, ce.accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        ('custom', 0.5)
    """
    if isinstance(loss, (TaskLoss, CallableLoss)):
        return loss
    if isinstance(loss, str):
        if loss not in LOSS_KINDS:
            raise UsageError(f"unknown {what} {loss!r}: expected {_EXPECTED}")
        return TaskLoss(loss)
    if callable(loss):
        return CallableLoss(loss)
    raise UsageError(f"{what} must be {_EXPECTED} (got {type(loss).__name__})")


def prototype_logits(fs: torch.Tensor, ys: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
    """-||fq - c_k||^2 for the class means c_k of the support features (classes 0..max label)."""
    fs, fq = fs.flatten(1), fq.flatten(1)
    n = int(ys.max()) + 1
    sums = torch.zeros(n, fs.shape[1], dtype=fs.dtype, device=fs.device).index_add(0, ys, fs)
    counts = torch.bincount(ys, minlength=n).to(fs.dtype).clamp_min(1).unsqueeze(1)
    protos = sums / counts
    return -((fq.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
