"""Task losses: cross-entropy with accuracy for classification, mean squared error for regression."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TaskLoss:
    kind: str  # "classification" | "regression"

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
        if self.kind != "classification":
            return None
        return (pred.argmax(-1) == target).float().mean(-1)
