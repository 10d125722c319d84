"""The interface every meta-learning algorithm shares.

An algorithm wraps a model split into trunk and inner part (`mrml.models.split`), and offers:
- `meta_gradient(episodes)`: fill `.grad` of the outer parameters with the meta-gradient averaged
  over the episodes (or add it, `accumulate=True`), return the step's statistics (query loss,
  accuracy, solver figures);
- `adapted_parameters(episode)` -> the inner parameters after test-time adaptation, by model name;
- `adapt(episode)` -> query predictions after test-time adaptation (for evaluation).
The outer optimizer is an ordinary `torch.optim` optimizer over `outer_parameters()`.
"""
from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from .. import functional as fn
from ..functional import MAX_HALVINGS, descend, detached, guard_rtol  # noqa: F401 (re-exported)
from ..pytree import flatten as flat  # noqa: F401 (re-exported: benchmarks/theory.py)
from ..data.base import Episode
from ..errors import UsageError
from ..models.modes import evaluation_modes
from ..models.split import ModelSplit, Params, split_model
from ..solvers.head import HeadLayout
from ..solvers.newton import InnerSolveInfo
from .algo_config import IMPLICIT_SYSTEMS, INNER_SOLVERS, AlgoConfig  # noqa: F401 (re-exported)
from .guards import FiniteWatch, check_dtypes, check_episode, check_episodes
from .exact_head import closed_form_head, solve_head
from .losses import LOSS_KINDS, Loss, TaskLoss, make_loss

@dataclass
class StepStats:
    """Averages over the tasks of one meta-step (what `meta_gradient` and `evaluate` return).

    Attributes:
        loss: the query loss f (before the outer step).
        accuracy: query accuracy, or None where the loss has none (regression, a custom loss on
            other than (n, C) logits and integer labels).
        extra: algorithm-specific figures by name (solver iterations, residuals, inner step size,
            a learned lambda); empty where there are none.

    Example:
        >>> s = StepStats(0.5, None, {"cg_iterations": 3.0})
        >>> s.loss, s.accuracy, sorted(s.extra)
        (0.5, None, ['cg_iterations'])
    """

    loss: float
    accuracy: float | None
    extra: dict[str, float] = field(default_factory=dict)


def host_floats(values: dict[str, Any]) -> dict[str, float]:
    """`values` as Python floats, the tensors among them read in one host synchronisation."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    read: dict[str, float] = {}
    if tensors:
        device = next(iter(tensors.values())).device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        stacked = torch.stack([t.detach().reshape(()).to(device, dtype) for t in tensors.values()])
        read = dict(zip(tensors, stacked.tolist()))
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


def mean_stats(per_task: list[StepStats]) -> StepStats:
    """The mean of per-task statistics.

    Args:
        per_task: one `StepStats` per task (at least one).

    Returns:
        Mean loss; mean accuracy over the tasks that report one (None if none does); each `extra`
        key's sum over all tasks divided by their number (a task lacking the key counts 0).

    Example:
        >>> s = mean_stats([StepStats(1.0, 0.5, {"a": 2.0}), StepStats(3.0, None, {"b": 4.0})])
        >>> s.loss, s.accuracy, s.extra
        (2.0, 0.5, {'a': 1.0, 'b': 2.0})
    """
    n = len(per_task)
    acc = [s.accuracy for s in per_task if s.accuracy is not None]
    keys = {k for s in per_task for k in s.extra}
    extra = {k: sum(s.extra.get(k, 0.0) for s in per_task) / n for k in sorted(keys)}
    return StepStats(sum(s.loss for s in per_task) / n, sum(acc) / len(acc) if acc else None, extra)


class MetaAlgorithm(abc.ABC):
    """Base of the meta-learning algorithms: model split, losses, the regularised inner loss g and
    plain inner gradient descent.

    Args:
        model: any `nn.Module`; its parameters split into outer ones (the optimizer's) and the inner
            part adapted per task (`config.inner`).
        loss: the query (outer) loss f: "classification", "regression", a `TaskLoss`, or any callable
            `loss(pred, target) -> scalar tensor` (accuracy is then reported when pred are (n, C)
            logits and target integer labels).
        config: the shared settings (`AlgoConfig`).
        trunk: None: the automatic split (`mrml.models.split`); else a submodule of `model` (its name,
            dotted names allowed, or the module) that the forward calls once on the input: it runs
            once per input set with gradient and the inner loop re-runs only the rest on its detached
            output. With a trunk and `config.inner` None, every parameter outside it adapts.
        inner_loss: the data term of the inner loss g on the support set, when it differs from
            `loss` (same forms); g adds the regulariser. Closed forms of a linear head apply only to
            a built-in kind with the same inner and outer loss.

    Raises:
        UsageError: a misspelt or non-callable loss, an unknown trunk, an inner spec naming no
            parameter or parameters of the trunk, or settings this algorithm does not accept.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import MRML, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        ...         self.classifier = nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.classifier(self.features(x))
        >>> learner = MRML(Net(), "classification", AlgoConfig(inner="classifier"), trunk="features")
        >>> opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-2)
        >>> labels = torch.arange(3)
        >>> ep = Episode(torch.randn(6, 4), labels.repeat(2), torch.randn(9, 4), labels.repeat(3))
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> learner.adapt(ep).shape
        torch.Size([9, 3])
    """

    name = "base"
    #: whether the inner part's initial value is learned (MAML family) or fixed (mrml/ITD-BiO head)
    learns_inner_init = False
    #: the inner part and inner-loss strength lambda when the config leaves them unset
    default_inner = "head"
    default_l2 = 1e-2
    #: whether `config.batched` (task_chunk > 1, amp, compile) has a path here (mrml and imaml)
    has_batched_path = False
    #: inner solvers this algorithm accepts (the first is its default); exact solvers only where the
    #: hypergradient is implicit (an unrolled method differentiates its gradient steps)
    inner_solvers: tuple[str, ...] = ("gd",)
    #: whether lambda can be learned (its gradient comes from the implicit surrogate)
    can_learn_l2 = False
    #: whether lambda is learned by default where the exact inner solve is the default (mrml's head)
    default_learn_l2 = False
    #: whether predictions come from class prototypes of the trunk's embeddings (ProtoNet: no head)
    prototypes = False
    #: whether `config.project_head` (the wider part with its head solved exactly) has a form here (mrml)
    has_projected_form = False

    def __init__(self, model: nn.Module, loss: TaskLoss | str | Callable = "classification",
                 config: AlgoConfig | None = None, *, trunk: str | nn.Module | None = None,
                 inner_loss: TaskLoss | str | Callable | None = None):
        self.model = model
        #: the query (outer) loss f
        self.loss: Loss = make_loss(loss)
        #: the data term of the inner loss g on the support set (the query loss unless given)
        self.support_loss: Loss = self.loss if inner_loss is None else make_loss(inner_loss, "inner_loss")
        self.config = replace(config or AlgoConfig())
        if self.config.batched and not self.has_batched_path:
            raise UsageError(f"--task-chunk, --amp and --compile apply to mrml and imaml, not {self.name}: drop them")
        if self.config.inner is None and trunk is None:
            self.config.inner = self.default_inner
        if self.config.l2 is None:
            self.config.l2 = self.default_l2
        cfg = self.config
        # the task-batched path runs a trunk module on stacked tasks: no automatic split at a head's input
        # there (an explicit trunk= runs through the model's forward task by task: `BatchedTrunk`)
        self.split: ModelSplit = split_model(model, cfg.inner, cfg.recompute_features, trunk,
                                             head_split_ok=not cfg.batched)
        if cfg.inner is None:  # explicit trunk: everything outside it adapts
            cfg.inner = ",".join(self.split.model_name[n] for n in self.split.inner_names)
        self.prox = cfg.prox = cfg.prox if cfg.prox is not None else not self.split.inner_is_last_stage
        #: closed forms of a linear head (None when the inner part is anything else, or the losses are
        #: not one built-in kind)
        same_builtin = self.loss.kind in LOSS_KINDS and self.support_loss == self.loss
        self.head: HeadLayout | None = (HeadLayout(self.split.inner_init())
                                        if same_builtin and closed_form_head(self.split, self.loss.kind) else None)
        if cfg.inner_solver is None:
            # exact solves by default where the inner problem is the convex head (per task and on the
            # task-batched path alike); wider, non-convex inner parts run the gd form (see README)
            exact_ok = self.head is not None
            cfg.inner_solver = self.inner_solvers[0] if exact_ok or "gd" not in self.inner_solvers else "gd"
            why = None if exact_ok or self.inner_solvers[0] == "gd" else self._why_not_exact(same_builtin)
            if why:  # the estimator is not the default one: say so, in one line
                warnings.warn(f"{self.name}: {why}: running {cfg.inner_steps} gradient steps + CG at a fixed lambda, "
                              "not the exact default (newton inner solve, direct system, learned lambda); set "
                              "inner_solver to choose the form without this warning", stacklevel=3)
        if cfg.inner_solver not in self.inner_solvers:
            known = cfg.inner_solver in INNER_SOLVERS
            raise UsageError(f"{self.name} accepts --inner-solver {' or '.join(self.inner_solvers)}"
                             + (f" (got {cfg.inner_solver!r}: it differentiates its gradient steps)" if known
                                else f" (got {cfg.inner_solver!r})"))
        if cfg.project_head and not self.has_projected_form:
            raise UsageError(f"--project-head is a form of mrml, not of {self.name}: drop it")
        if cfg.learn_l2 is None:  # learned by default only in the default form (exact solve of a linear head)
            # and in mrml's wider form, whose head is solved exactly too (`projected`)
            cfg.learn_l2 = self.default_learn_l2 and ((cfg.inner_solver == "newton" and self.head is not None)
                                                      or bool(cfg.project_head))
        if cfg.inner_solver == "newton" and not cfg.l2 > 0:
            raise UsageError(f"--inner-solver newton needs --l2 > 0 (got {cfg.l2}): without it the inner problem "
                             "may have no minimiser; use --inner-solver gd for l2 = 0")
        if cfg.learn_l2 and not self.can_learn_l2:
            raise UsageError(f"--learn-l2 applies to mrml and imaml (implicit hypergradients), not {self.name}: drop it")
        if cfg.learn_l2 and not cfg.l2 > 0:
            raise UsageError(f"--learn-l2 starts from --l2 and needs it > 0 (got {cfg.l2})")
        self.log_l2: nn.Parameter | None = None
        if cfg.learn_l2:
            ref = next(iter(self.split.inner_init().values()))
            self.log_l2 = nn.Parameter(torch.tensor(math.log(cfg.l2), dtype=ref.dtype, device=ref.device))
        #: the last inner solve's record (`InnerSolveInfo`; test-time adaptation: its summaries as Python numbers)
        self.last_inner = InnerSolveInfo(cfg.inner_solver, 0, float("nan"), False)

    def _why_not_exact(self, same_builtin: bool) -> str | None:
        """Why a head that could take the exact default does not (None: the inner part is no linear head)."""
        bare = closed_form_head(self.split, "classification")
        if self.config.batched and (bare or self.split.general_reason):
            return ("the task-batched path (--task-chunk/--amp/--compile) runs the trunk module on stacked tasks and "
                    "cannot split this model at its head's input (the per-task path can)")
        if self.split.general_reason:
            return f"inner part {self.config.inner!r} is one linear layer but no closed form applies: {self.split.general_reason}"
        if bare and not same_builtin:
            got = "a different inner loss" if self.loss.kind in LOSS_KINDS else "a custom loss"
            return (f"the closed forms of the linear head {self.config.inner!r} need one built-in loss ('classification' "
                    f"or 'regression') for the inner and outer loss (got {got})")
        return None

    # -- parameters ----------------------------------------------------------------------------
    def outer_parameters(self) -> list[nn.Parameter]:
        """What the outer optimizer updates: everything but a fixed (not learned) inner init."""
        inner = {id(p) for p in self.split.inner_parameters()}
        learned_init = self.learns_inner_init or self.prox or bool(self.config.project_head)
        params = [p for p in self.model.parameters() if learned_init or id(p) not in inner]
        return params + ([self.log_l2] if self.log_l2 is not None else [])

    # -- lambda ------------------------------------------------------------------------------------
    @property
    def l2(self) -> float:
        """The inner-loss strength lambda in use (learned: exp of the outer variable log_l2), read on the host."""
        return float(self.l2_value())

    def l2_value(self) -> torch.Tensor | float:
        """lambda without graph: a 0-d tensor when learned (no host read), else the configured float."""
        return self.log_l2.detach().exp() if self.log_l2 is not None else float(self.config.l2)

    def l2_attached(self) -> torch.Tensor | float:
        """lambda as the surrogate sees it: a tensor with gradient when learned, else a constant."""
        return self.log_l2.exp() if self.log_l2 is not None else float(self.config.l2)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        if self.log_l2 is not None:
            self.log_l2.grad = None

    # -- losses --------------------------------------------------------------------------------
    def regulariser(self, y: Params, centre: Params | None, lam: torch.Tensor | float | None = None) -> torch.Tensor:
        lam = self.l2_value() if lam is None else lam
        terms = [((v - centre[k]) if centre is not None else v).pow(2).sum() for k, v in y.items()]
        return 0.5 * lam * torch.stack(terms).sum()

    def inner_loss(self, xa: Params, y: Params, feats: torch.Tensor, labels: torch.Tensor, centre: Params | None,
                   lam: torch.Tensor | float | None = None) -> torch.Tensor:
        """g(x, y): support loss of the adapted part plus (lam/2)||y - centre||^2 (centre 0 if None;
        lam the current lambda unless given, e.g. attached when learned)."""
        g = self.support_loss(self.split.predict({**xa, **y}, feats), labels)
        if self.config.l2 > 0:
            g = g + self.regulariser(y, centre, lam)
        return g

    def inner_objective(self, x: Params, y: Params, batch: tuple) -> torch.Tensor:
        """g(x, y, batch) as the functional core takes it: batch = (support features, labels, centre or
        None, lambda or None)."""
        feats, labels, centre, lam = batch
        return self.inner_loss(x, y, feats, labels, centre, lam)

    def solve_inner(self, xa: Params, y0: Params, feats: Any, labels: torch.Tensor, steps: int, lr: float,
                    centre: Params | None) -> Params:
        """The inner solution from y0 by `config.inner_solver`, without graph: `gd` takes `steps` guarded
        gradient steps of size `lr`; `newton` solves to `config.inner_tol` with `steps` as the iteration
        cap (closed-form Hessian for a linear head, Newton-CG otherwise: `mrml.functional.solve_inner`).
        Statistics in `self.last_inner`, the final step size in `self.last_inner_lr`."""
        cfg = self.config
        if cfg.inner_solver == "newton" and self.head is not None:  # the default form's solve on one task
            self.last_inner_lr = lr
            y, self.last_inner = solve_head(self, feats, labels, y0, centre, steps)
            return y
        batch = (feats, labels, centre, None)
        if cfg.inner_solver == "gd":  # the task-batched path's masked loop on one task: no host read per step
            def g1(x: Params, y: Params, b: tuple) -> torch.Tensor:
                return self.inner_objective(x, {k: v[0] for k, v in y.items()}, b).unsqueeze(0)

            y1, info = fn.solve_inner(g1, xa, {k: v.detach().unsqueeze(0) for k, v in y0.items()}, batch, solver="gd",
                                      steps=steps, lr=lr, guard=not cfg.plain_inner, batched=True)
            self.last_inner, self.last_inner_lr = info, info.lr
            return {k: v[0] for k, v in y1.items()}
        y, info = fn.solve_inner(self.inner_objective, xa, y0, batch, solver=cfg.inner_solver, steps=steps, lr=lr,
                                 tol=cfg.inner_tol, guard=not cfg.plain_inner, cg_steps=cfg.cg_steps)
        self.last_inner, self.last_inner_lr = info, info.lr
        return y

    def centre(self, attached: bool) -> Params | None:
        if not self.prox:
            return None
        init = self.split.inner_init()
        return init if attached else detached(init)

    def gradient_descent(
        self, xa: Params, y: Params, feats: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, centre: Params | None
    ) -> Params:
        """K gradient steps on g in y without graph (see `descend` for the divergence guard)."""
        value_and_grad = fn.inner_value_and_grad(self.inner_objective, xa, (feats, labels, centre, None))
        return self.descend(value_and_grad, detached(y), steps, lr)

    def descend(
        self, value_and_grad: Callable[[Params], tuple[torch.Tensor, tuple[torch.Tensor, ...]]], y: Params,
        steps: int, lr: float,
    ) -> Params:
        """`steps` accepted steps y <- y - lr * d_y g, with `value_and_grad(y)` -> (g, d_y g).

        Divergence guard (unless `config.plain_inner`): a step after which g went up (or is not finite)
        by more than `guard_rtol` of the parameters' dtype, relative, is taken back and retried from the
        previous point at half the step size, kept for the remaining steps (at most `MAX_HALVINGS`).
        While g decreases this is plain gradient descent with step `lr`. The rule is the same whether the steps keep a graph (the
        unrolled baselines) or not (mrml); the step-size decisions are constants to autograd. The step
        size in use at the end is left in `self.last_inner_lr`.
        """
        y, self.last_inner_lr = descend(value_and_grad, y, steps, lr, guard=not self.config.plain_inner)
        return y

    # -- the entry points ----------------------------------------------------------------------
    def meta_gradient(self, episodes: list[Episode], task_ids: list[Any] | None = None,
                      scale: float | None = None, *, accumulate: bool = False,
                      check_finite: bool = True) -> StepStats:
        """Set `.grad` of the outer parameters to the mean meta-gradient over `episodes`.

        Args:
            episodes: the tasks of one meta-batch.
            task_ids: stable ids of the tasks (for `config.warm_start`), or None.
            scale: None: the mean over `episodes`; else `scale` x their sum (a shard of a meta-batch
                split across processes, or a part of one accumulated over calls).
            accumulate: add into the existing `.grad` instead of replacing it (gradient accumulation
                over several calls before one optimizer step).
            check_finite: raise on a non-finite query loss or gradient, or a classification support set
                with fewer than 2 classes, read with one host synchronisation at the end of the call
                (`mrml.algorithms.guards.FiniteWatch`); False leaves that to the caller (`mrml train`
                checks the reduced gradient itself).

        Returns:
            The statistics averaged over the tasks (query loss, accuracy, solver figures).

        Raises:
            UsageError: not a non-empty list of well-formed episodes (`guards.check_episodes`), task_ids
                not one per episode, or a classification support set holding fewer than 2 classes.
            NonFiniteError: a non-finite query loss or gradient, naming the first such episode (its index
                in `episodes`, and its task id); `.grad` is then cleared (None), accumulated part included.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mrml import ANIL, AlgoConfig, Episode
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> learner = ANIL(model, "classification", AlgoConfig(inner="2", inner_steps=2))
            >>> labels = torch.arange(3)
            >>> eps = [Episode(torch.randn(6, 4), labels.repeat(2), torch.randn(6, 4), labels.repeat(2))
            ...        for _ in range(2)]
            >>> _ = learner.meta_gradient(eps[:1], scale=0.5)
            >>> _ = learner.meta_gradient(eps[1:], scale=0.5, accumulate=True)
            >>> summed = model[0].weight.grad.clone()
            >>> _ = learner.meta_gradient(eps)  # the mean over both, in one call
            >>> torch.allclose(summed, model[0].weight.grad)
            True
        """
        scale, ids, watch = self.begin_step(episodes, task_ids, scale, accumulate, check_finite)
        per_task = []
        for i, (ep, tid) in enumerate(zip(episodes, ids)):
            per_task.append(self.task_gradient(ep, scale, tid))
            if watch is not None:
                watch.done([i])
        if watch is not None:
            watch.check(per_task)
        return mean_stats(per_task)

    def begin_step(self, episodes: list[Episode], task_ids: list[Any] | None, scale: float | None,
                   accumulate: bool, check_finite: bool = True) -> tuple[float, list[Any], FiniteWatch | None]:
        """What every `meta_gradient` path does first: the episodes and ids checked (`check_episodes`),
        `.grad` zeroed unless `accumulate`; returns the per-task scale (1/len(episodes) unless given), the
        task ids (None each unless given) and the step's `FiniteWatch` (None unless `check_finite`)."""
        ids = check_episodes(episodes, task_ids)
        check_dtypes(self, episodes)
        watch = FiniteWatch(self, episodes, ids, accumulate) if check_finite else None
        if not accumulate:
            self.zero_grad()
        scale = 1.0 / len(episodes) if scale is None else scale
        return scale, ids, watch

    @abc.abstractmethod
    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        """Accumulate `scale` x this task's meta-gradient into `.grad`; return its statistics."""

    def adapted_inner(self, xa: Params, fs: Any, ys: torch.Tensor) -> Params:
        """The test-time inner solution on support features `fs` (adapt-local names), without graph:
        here `test_steps` steps at `test_lr` (or the exact solve) on the inner loss."""
        cfg = self.config
        return self.solve_inner(xa, self.split.inner_init(), fs, ys, cfg.test_steps, cfg.test_lr, self.centre(False))

    def _test_time(self, ep: Episode, query: bool) -> tuple[Params, Params, Any]:
        """(outer part of the adapted module, adapted inner part, query features or None)."""
        with torch.no_grad():
            fs = self.split.features(ep.support_x)
            fq = self.split.features(ep.query_x) if query else None
        xa = detached(self.split.adapt_outer())
        return xa, self.adapted_inner(xa, fs, ep.support_y), fq

    def adapted_parameters(self, episode: Episode) -> dict[str, torch.Tensor]:
        """The inner parameters after test-time adaptation on `episode`'s support set (trunk frozen).

        Args:
            episode: the task; only its support set is used.

        Returns:
            The adapted inner parameters, detached, keyed by the model's parameter names (those of
            `model.named_parameters()`): `functional_call(model, {**params, **adapted}, x)` runs the
            adapted model.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.func import functional_call
            >>> from mrml import ITDBiO, AlgoConfig, Episode
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> learner = ITDBiO(model, "classification", AlgoConfig(inner="2"))
            >>> labels = torch.arange(3)
            >>> ep = Episode(torch.randn(6, 4), labels.repeat(2), torch.randn(9, 4), labels.repeat(3))
            >>> adapted = learner.adapted_parameters(ep)
            >>> {k: tuple(v.shape) for k, v in adapted.items()}
            {'2.weight': (3, 8), '2.bias': (3,)}
            >>> pred = functional_call(model, {**dict(model.named_parameters()), **adapted}, (ep.query_x,))
            >>> torch.allclose(pred, learner.adapt(ep))
            True
        """
        with evaluation_modes(self.model):
            _, y, _ = self._test_time(episode, query=False)
        return {k: v.detach() for k, v in self.split.to_model_names(y).items()}

    def adapt(self, ep: Episode, adapt: str = "head", *, adapt_steps: int | None = None,
              adapt_lr: float | None = None, adapt_prox: float | None = None) -> torch.Tensor:
        """Query predictions after test-time adaptation: by default (`adapt="head"`) trunk frozen, inner
        part adapted on the support set as `adapted_parameters` does. Leaves `.grad` untouched. Deterministic: dropout and
        other train-only layers are off, batch norm normalises as in meta-training (by the batch's
        statistics in train mode, running statistics not updated), every module's mode restored
        afterwards (`mrml.models.modes.evaluation_modes`; `adapted_parameters` and `evaluate` alike).

        Args:
            ep: the task: the inner part adapts on its support set, and predicts its query inputs.
            adapt: head (the above), last-block or all (then that part fine-tuned on the support set by
                Adam from the trained weights and the adapted inner part; a part inside a user's
                `trunk=` in a model without stages means the trunk runs in every step), or auto (per
                task, head or last-block by cross-validation over the support shots):
                `mrml.algorithms.finetune`.
            adapt_steps, adapt_lr, adapt_prox: the fine-tuning's Adam steps, step size and proximal
                strength (None: `finetune.DEFAULT_ADAPT_*`); not with head.

        Returns:
            The model's output on `ep.query_x` (e.g. (n_query, C) logits), without graph.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mrml import MAML, AlgoConfig, Episode
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> learner = MAML(model, "classification", AlgoConfig(inner_steps=2))
            >>> ep = Episode(torch.randn(6, 4), torch.arange(3).repeat(2), torch.randn(9, 4), torch.arange(3).repeat(3))
            >>> pred = learner.adapt(ep)
            >>> pred.shape, pred.requires_grad, torch.equal(pred, learner.adapt(ep))
            (torch.Size([9, 3]), False, True)
        """
        if adapt != "head" or adapt_steps is not None or adapt_lr is not None or adapt_prox is not None:
            return self.adapt_beyond_head(ep, adapt, adapt_steps, adapt_lr, adapt_prox)[0]
        with evaluation_modes(self.model):
            xa, y, fq = self._test_time(ep, query=True)
            with torch.no_grad():
                return self.split.predict({**xa, **y}, fq)

    def adapt_beyond_head(self, ep: Episode, adapt: str, steps: Any, lr: Any, prox: Any) -> tuple[torch.Tensor, str]:
        """(query predictions, the adaptation used) under the checked settings (`finetune.predictions`)."""
        from .finetune import adapt_settings, predictions

        return predictions(self, ep, adapt_settings(adapt, steps, lr, prox))

    def evaluate(self, ep: Episode, adapt: str = "head", *, adapt_steps: int | None = None,
                 adapt_lr: float | None = None, adapt_prox: float | None = None) -> StepStats:
        """Query loss and accuracy after test-time adaptation (`adapt`) on one task.

        Args:
            ep: the task (a held-out one for meta-testing).
            adapt, adapt_steps, adapt_lr, adapt_prox: what adapts (as for `adapt`; default: the
                algorithm's own adaptation, trunk frozen).

        Returns:
            `StepStats` with the query loss and accuracy (None where the loss has none); `extra` empty,
            except under adapt="auto": `adapt_last_block` 1.0 where last-block was chosen, else 0.0.

        Raises:
            UsageError: `ep` is not a well-formed Episode, a classification support set holds fewer
                than 2 classes, or a bad adapt setting (one line). NonFiniteError: `ep` holds NaN or
                infinite values.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mrml import MRML, AlgoConfig, Episode
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
            >>> learner = MRML(model, "classification", AlgoConfig(inner="2"))
            >>> y = torch.arange(3).repeat(2)
            >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
            >>> stats = learner.evaluate(ep)
            >>> round(stats.loss, 2), round(stats.accuracy, 2), stats.extra
            (1.26, 0.17, {})
        """
        check_episode(self, ep)
        check_dtypes(self, [ep], "evaluate")
        extra: dict[str, float] = {}
        if adapt == "head" and adapt_steps is None and adapt_lr is None and adapt_prox is None:
            pred = self.adapt(ep)
        else:
            pred, used = self.adapt_beyond_head(ep, adapt, adapt_steps, adapt_lr, adapt_prox)
            if adapt == "auto":
                extra["adapt_last_block"] = float(used == "last-block")
        return StepStats(float(self.loss(pred, ep.query_y)), self.loss.accuracy(pred, ep.query_y), extra)

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state beyond the model (a learned lambda, warm starts); saved in checkpoints."""
        return {"log_l2": self.log_l2.detach().clone()} if self.log_l2 is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.log_l2 is not None and "log_l2" in state:
            with torch.no_grad():
                self.log_l2.copy_(state["log_l2"])
