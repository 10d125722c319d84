"""Prototypical networks (Snell, Swersky & Zemel 2017): no inner loop, a metric on backbone features.

Per task, each class's prototype is the mean backbone feature of its support examples; the logits
of a query example are minus its squared euclidean distances to the prototypes; the meta-gradient
is the gradient of the query cross-entropy with respect to the backbone. Only the backbone (the
trunk of the split at the head) is used: the head is ignored, gets no gradient and is not among the
outer parameters (the ignored part is the inner spec, "head" by default; `inner_steps`, `l2` and
the other inner-loop settings do not apply). `adapt` computes the prototypes on the support set. Classification only.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ..data.base import Episode
from ..errors import UsageError
from ..models.modes import evaluation_modes
from .base import AlgoConfig, MetaAlgorithm, StepStats
from .losses import TaskLoss, make_loss, prototype_logits


class ProtoNet(MetaAlgorithm):
    """Prototypical networks: each class's prototype is the mean backbone feature of its support
    examples, a query's logits are minus its squared distances to them; the query cross-entropy is
    backpropagated to the backbone. No inner loop; the head (the inner spec) is unused.

    Args:
        model, loss, config, trunk: as for `MetaAlgorithm` (classification only; no `inner_loss`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import ProtoNet, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = ProtoNet(model, "classification", AlgoConfig(inner="2"))  # backbone: model[:2]
        >>> len(learner.outer_parameters()), learner.adapted_parameters(None)
        (2, {})
        >>> opt = torch.optim.SGD(learner.outer_parameters(), lr=0.1)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), learner.adapt(ep).shape
        (1.23, torch.Size([6, 3]))
    """

    name = "protonet"
    learns_inner_init = False
    default_inner = "head"
    default_l2 = 0.0
    prototypes = True

    def __init__(self, model: nn.Module, loss: TaskLoss | str | Callable = "classification",
                 config: AlgoConfig | None = None, *, trunk: str | nn.Module | None = None,
                 inner_loss: Any = None):
        kind = make_loss(loss).kind
        if kind == "regression":
            raise UsageError(f"protonet needs classification tasks (class prototypes), not {kind}: choose another --algo")
        if inner_loss is not None:
            raise UsageError("protonet has no inner loop: drop inner_loss")
        # the split at the ignored part (default: the head; with trunk=..., everything outside it):
        # its trunk is the backbone
        config = replace(config or AlgoConfig(), recompute_features=False, prox=False)
        super().__init__(model, loss, config, trunk=trunk)
        if not any(True for _ in self.split.trunk.parameters()):
            raise UsageError(f"protonet uses the network before its head; --inner {self.config.inner} leaves no backbone: use --inner head")

    def outer_parameters(self) -> list[nn.Parameter]:
        return list(self.split.trunk.parameters())

    def logits(self, ep: Episode) -> torch.Tensor:
        return prototype_logits(self.split.embeddings(ep.support_x), ep.support_y, self.split.embeddings(ep.query_x))

    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        pred = self.logits(ep)
        f = self.loss(pred, ep.query_y)
        (scale * f).backward()
        return StepStats(float(f.detach()), self.loss.accuracy(pred.detach(), ep.query_y))

    def adapted_parameters(self, episode: Episode) -> dict[str, torch.Tensor]:
        """No parameter adapts (the prototypes are computed from the support features): {}."""
        return {}

    def adapt(self, ep: Episode, adapt: str = "head", *, adapt_steps: int | None = None,
              adapt_lr: float | None = None, adapt_prox: float | None = None) -> torch.Tensor:
        """Query logits from the support prototypes (evaluation modes: `mrml.models.modes`). adapt
        last-block / all / auto: the named part of the embedding first fine-tuned on the support set with
        the prototype classifier's loss (prototypes from the support set; `mrml.algorithms.finetune`)."""
        if adapt != "head" or adapt_steps is not None or adapt_lr is not None or adapt_prox is not None:
            return self.adapt_beyond_head(ep, adapt, adapt_steps, adapt_lr, adapt_prox)[0]
        with evaluation_modes(self.model), torch.no_grad():
            return self.logits(ep)
