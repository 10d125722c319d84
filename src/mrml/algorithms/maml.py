"""MAML (Finn et al. 2017) and first-order MAML: the iterative-differentiation family.

Per task, K gradient steps on the inner loss g adapt the inner part y from its initial value, and the
query loss f(x, y_K) is backpropagated through the whole inner path (`create_graph=True`): the
meta-gradient is exactly d f(x, y_K(x, y_0)) / d(x, y_0), with memory growing linearly in K. The
trunk (everything before the first stage that holds an inner parameter) runs once per image set,
with gradient; the unrolled steps re-run only the adapted part on those attached features, so ANIL
and ITD-BiO (`anil.py`, `itd_bio.py`) reuse this loop with the head as inner part.

First order (`fomaml`, or `config.first_order`): every inner gradient is taken on detached inputs
and treated as a constant, so y_K = y_0 - alpha * (sum of constants): the initialisation receives
d_y f(x, y_K) (the query gradient at the adapted parameters) and the outer parameters of the trunk
and adapted part receive only their direct term d_x f(x, y_K).

Test-time adaptation runs the training inner loop -- `inner_steps` steps at `inner_lr` on the same
inner loss, from the learned initialisation -- because that is the procedure the initialisation was
meta-learned for (MAML's learned init is tuned to K steps of size alpha; `test_steps`/`test_lr` are
the test-time settings of mrml, iMAML and ITD-BiO). Set `config.extra["test_adaptation"] = "test"` to
use `test_steps` at `test_lr` instead; without it, test settings other than their defaults are named
in a warning (they are not used). The same holds for ANIL and Reptile.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .. import pytree
from ..data.base import Episode
from ..errors import UsageError
from ..settings import default_of, field_of, flag
from ..models.split import Params
from .base import MetaAlgorithm, StepStats, detached


class Unrolled(MetaAlgorithm):
    """Iterative differentiation through K inner steps; subclasses choose the defaults."""

    name = "unrolled"
    #: force first order regardless of `config.first_order` (FOMAML)
    force_first_order = False

    @property
    def first_order(self) -> bool:
        return self.force_first_order or self.config.first_order

    def init_learned(self) -> bool:
        return self.learns_inner_init or self.prox

    def unroll(self, xa: Params, y0: Params, fs: torch.Tensor, ys: torch.Tensor, steps: int, lr: float,
               centre: Params | None) -> Params:
        """K steps y <- y - lr d_y g(x, y) (with the divergence guard of `MetaAlgorithm.descend`); the
        graph through the accepted steps is kept unless first order."""
        return self.descend(self.unrolled_value_and_grad(xa, fs, ys, centre), y0, steps, lr)

    def unrolled_value_and_grad(self, xa: Params, fs: torch.Tensor, ys: torch.Tensor, centre: Params | None,
                                ) -> Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """y -> (g(x, y) detached, d_y g): with graph (`create_graph=True`), or first order as constants
        taken on detached inputs."""
        first = self.first_order
        if first:  # inner gradients are constants: evaluate them on detached inputs
            xa_d, fs_d = detached(xa), pytree.detach(fs)
            c_d = detached(centre) if centre is not None else None

        def value_and_grad(y: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            if first:
                yd = detached(y, requires_grad=True)
                with torch.enable_grad():
                    g = self.inner_loss(xa_d, yd, fs_d, ys, c_d)
                    return g.detach(), torch.autograd.grad(g, list(yd.values()))
            g = self.inner_loss(xa, y, fs, ys, centre)
            return g.detach(), torch.autograd.grad(g, list(y.values()), create_graph=True)

        return value_and_grad

    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        cfg, split = self.config, self.split
        fs, fq = split.features(ep.support_x), split.features(ep.query_x)  # trunk once, with gradient
        xa = split.adapt_outer()
        init = split.inner_init()
        y0 = init if self.init_learned() else detached(init, requires_grad=True)
        y = self.unroll(xa, y0, fs, ep.support_y, cfg.inner_steps, cfg.inner_lr, self.centre(True))
        pred = split.predict({**xa, **y}, fq)
        f = self.loss(pred, ep.query_y)
        (scale * f).backward()
        return StepStats(float(f.detach()), self.loss.accuracy(pred.detach(), ep.query_y), self.step_extra())

    def step_extra(self) -> dict[str, float]:
        """A task's extra statistics: the inner step size in use at the end (the guard may halve it)."""
        return {"inner_lr": self.last_inner_lr}

    def test_schedule(self) -> tuple[int, float]:
        """(steps, step size) of test-time adaptation: `inner_steps` at `inner_lr` (the training loop),
        or `test_steps` at `test_lr` with `config.extra["test_adaptation"] = "test"`. Test settings
        other than their defaults that the training loop leaves unused are named in a warning (once)."""
        cfg = self.config
        mode = cfg.extra.get("test_adaptation", "train")
        if mode not in ("train", "test"):
            raise UsageError(f"extra test_adaptation must be 'train' (the training inner loop) or 'test' (test_steps "
                             f"at test_lr), got {mode!r}")
        if mode == "test":
            return cfg.test_steps, cfg.test_lr
        unused = [f"{flag(n)} {getattr(cfg, n)}" for n in ("test_steps", "test_lr")
                  if getattr(cfg, n) != default_of(field_of(cfg, n))]
        if unused and not self.__dict__.get("_warned_test_settings"):
            self._warned_test_settings = True
            warnings.warn(f"{self.name} adapts at test time with its training inner loop (--inner-steps "
                          f"{cfg.inner_steps} at --inner-lr {cfg.inner_lr:g}): {' and '.join(unused)} not used; "
                          "AlgoConfig(extra={'test_adaptation': 'test'}) uses them", stacklevel=3)
        return cfg.inner_steps, cfg.inner_lr

    def adapted_inner(self, xa: Params, fs: Any, ys: torch.Tensor) -> Params:
        """The training inner loop (K steps at alpha, see the module docstring), without graph."""
        steps, lr = self.test_schedule()
        return self.gradient_descent(xa, self.split.inner_init(), fs, ys, steps, lr, self.centre(False))


class MAML(Unrolled):
    """Second-order MAML: every parameter adapts (inner "all", no regulariser) by K gradient steps
    from the learned init, and the query loss is backpropagated through all of them (memory linear
    in K). `config.first_order=True` gives FOMAML. Test-time adaptation: the training inner loop.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import MAML, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = MAML(model, "classification", AlgoConfig(inner_steps=3))
        >>> opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-3)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), learner.adapt(ep).shape
        (1.12, torch.Size([6, 3]))
    """

    name = "maml"
    learns_inner_init = True
    default_inner = "all"
    default_l2 = 0.0


class FOMAML(MAML):
    """First-order MAML: the K inner gradients are constants, so the init receives the query
    gradient at the adapted parameters (no second-order terms, memory independent of K); the same
    as `MAML` with `config.first_order=True`. Test-time adaptation: the training inner loop.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import FOMAML, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> from mrml import MAML
        >>> learner = FOMAML(model, "classification", AlgoConfig(inner_steps=3))
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> _ = learner.meta_gradient([ep])
        >>> grad = model[0].weight.grad.clone()
        >>> _ = MAML(model, "classification", AlgoConfig(inner_steps=3, first_order=True)).meta_gradient([ep])
        >>> torch.equal(grad, model[0].weight.grad)
        True
    """

    name = "fomaml"
    force_first_order = True
