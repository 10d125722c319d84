"""Meta-SGD (Li, Zhou, Chen & Li 2017): MAML with learned per-parameter inner step sizes.

Every inner parameter y has a step-size tensor alpha of its shape (initialised to `config.inner_lr`),
and the K inner steps are y <- y - alpha * d_y g(x, y) (elementwise), unrolled with graph as in MAML
(`maml.Unrolled`; `config.first_order` makes the inner gradients constants, alpha still receives its
gradient through the steps). alpha is an outer variable: in `outer_parameters()`, learned by the same
optimizer as the initialisation, and saved in `state_dict()` (so checkpoints, `mrml.save_learner` and
`mrml.load_run` keep it). The divergence guard (unless `config.plain_inner`) halves all alphas of a
task together when g goes up; the factor in use at the end is the statistic `alpha_scale`.

Test-time adaptation: the training inner loop (`inner_steps` steps with the learned alphas), or
`test_steps` steps with them under `config.extra["test_adaptation"] = "test"`; `test_lr` is never used
(the alphas are the step sizes).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from .. import functional as fn
from ..errors import UsageError
from ..models.split import Params
from ..settings import default_of, field_of
from .base import detached
from .maml import Unrolled

ValueAndGrad = Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def scaled(value_and_grad: ValueAndGrad, alphas: Params) -> ValueAndGrad:
    """`value_and_grad` with each gradient multiplied elementwise by its alpha (same order as y)."""
    steps = list(alphas.values())

    def vg(y: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        g, grads = value_and_grad(y)
        return g, tuple(a * gr for a, gr in zip(steps, grads))

    return vg


class MetaSGD(Unrolled):
    """Meta-SGD: MAML's unrolled inner loop (inner "all", l2 = 0, learned init) with a learned step size
    per inner parameter entry, alpha, initialised to `inner_lr`: y <- y - alpha * d_y g. Second order by
    default (`config.first_order=True`: first order). Test-time adaptation: the training inner loop
    with the learned alphas.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Attributes:
        alphas: the step sizes, one `nn.Parameter` per inner parameter, by the model's parameter
            names (in the order of `split.inner_init()`); in `outer_parameters()` after the model's.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import MetaSGD, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = MetaSGD(model, "classification", AlgoConfig(inner_steps=2, inner_lr=0.1))
        >>> opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-2)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> alpha = learner.alphas["2.weight"]
        >>> alpha.shape, alpha.grad is not None, bool((alpha != 0.1).any())  # learned
        (torch.Size([3, 8]), True, True)
        >>> round(stats.loss, 2), sorted(stats.extra), learner.adapt(ep).shape
        (1.12, ['alpha_scale'], torch.Size([6, 3]))
    """

    name = "metasgd"
    learns_inner_init = True
    default_inner = "all"
    default_l2 = 0.0

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        lr = float(self.config.inner_lr)
        self.alphas: dict[str, nn.Parameter] = {
            self.split.model_name[k]: nn.Parameter(torch.full_like(v.detach(), lr))
            for k, v in self.split.inner_init().items()}

    def outer_parameters(self) -> list[nn.Parameter]:
        """The model's outer parameters (the init included), then the alphas."""
        return super().outer_parameters() + list(self.alphas.values())

    def zero_grad(self) -> None:
        super().zero_grad()
        for a in self.alphas.values():
            a.grad = None

    def unroll(self, xa: Params, y0: Params, fs: torch.Tensor, ys: torch.Tensor, steps: int, lr: float,
               centre: Params | None) -> Params:
        """K steps y <- y - alpha * d_y g (graph kept, as MAML's); `lr` is not used (the alphas are the
        step sizes; the guard's halvings scale them, from 1)."""
        return self.descend(scaled(self.unrolled_value_and_grad(xa, fs, ys, centre), self.alphas), y0, steps, 1.0)

    def step_extra(self) -> dict[str, float]:
        """`alpha_scale`: the factor on the alphas at the end of the task's steps (1 unless the guard halved)."""
        return {"alpha_scale": self.last_inner_lr}

    def test_schedule(self) -> tuple[int, float]:
        """(steps, 1.0): `inner_steps`, or `test_steps` under extra test_adaptation="test"; a `test_lr`
        other than its default is named in a warning there (the learned alphas are the step sizes)."""
        steps, _ = super().test_schedule()
        cfg = self.config
        if (cfg.extra.get("test_adaptation") == "test" and cfg.test_lr != default_of(field_of(cfg, "test_lr"))
                and not self.__dict__.get("_warned_test_lr")):
            self._warned_test_lr = True
            warnings.warn(f"metasgd steps with its learned alphas: --test-lr {cfg.test_lr:g} not used", stacklevel=3)
        return steps, 1.0

    def adapted_inner(self, xa: Params, fs: Any, ys: torch.Tensor) -> Params:
        """The test-time steps with the learned alphas, without graph."""
        steps, _ = self.test_schedule()
        vg = fn.inner_value_and_grad(self.inner_objective, xa, (fs, ys, self.centre(False), None))
        return self.descend(scaled(vg, detached(self.alphas)), detached(self.split.inner_init()), steps, 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus `alphas` by the model's parameter names."""
        return {**super().state_dict(), "alphas": {k: v.detach().clone() for k, v in self.alphas.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the alphas (when saved) after the base state; one-line UsageError if they do not fit."""
        super().load_state_dict(state)
        saved = state.get("alphas")
        if saved is None:
            return
        mine = self.alphas
        if not isinstance(saved, dict) or set(saved) != set(mine) or any(
                not isinstance(saved[k], torch.Tensor) or saved[k].shape != mine[k].shape for k in mine):
            raise UsageError(f"saved metasgd alphas do not fit this model's inner part {sorted(mine)}: load them into "
                             "a learner with the same model and inner part")
        with torch.no_grad():
            for k, a in mine.items():
                a.copy_(saved[k])
