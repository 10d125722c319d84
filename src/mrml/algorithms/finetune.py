"""Test-time adaptation beyond the head: fine-tune the last block or the whole network on the support set.

`learner.evaluate(ep, adapt=...)`, `learner.adapt(ep, adapt=...)`, `LoadedRun.evaluate(..., adapt=...)` and
`mrml eval --adapt` take one of `ADAPT_MODES`:
- `head` (default): the algorithm's own test-time adaptation (mrml: the head solved exactly), trunk frozen;
- `last-block` / `all`: first the algorithm's own adaptation, then the named part (`resolve_inner`: the
  model's last block + head, or every parameter) fine-tuned from the trained weights and the solved inner
  part theta0 by `steps` Adam steps at `lr` on the support loss (the learner's inner data term) +
  (prox/2) ||theta - theta0||^2, and the query predicted with the fine-tuned parameters. ProtoNet (no head)
  fine-tunes the named part of its embedding on the prototype classifier's loss over the support set
  (prototypes and points both from the support set);
- `auto`: per task, from the support set alone: with s >= 2 shots per class (regression: support points),
  min(s, `AUTO_FOLDS`) folds each holding out every class's j-th, (j+k)-th, ... shot; each way adapted on
  the rest and scored on the held-out shots (accuracy, ties broken by loss); `last-block` only when strictly
  better, else (and always at 1 shot) `head`.

The model's parameters are never modified (copies, `torch.func.functional_call`), `.grad` is untouched,
modes are `evaluation_modes` (batch norm by batch statistics, running ones not updated), and the result is
deterministic. The stages before the fine-tuned part (the model's `stages()` or `nn.Sequential` children, or
an explicit `trunk=` the part lies outside of) run once per input set without graph; only the rest runs in
the Adam loop. A fine-tuned part inside a user's `trunk=` in a model without stages means the whole model
(trunk included) runs in every step: correct, slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from .. import pytree
from ..data.base import Episode
from ..errors import UsageError
from ..models.modes import evaluation_modes
from ..models.split import Stages, model_stages, resolve_inner
from ..validation import BIG, LR_MAX, Range
from .losses import prototype_logits

ADAPT_MODES = ("head", "last-block", "all", "auto")
# Defaults of the fine-tuning (last-block / all / auto), chosen on validation episodes (benchmarks/adapt.py,
# benchmarks/results/adapt/select_*): in-domain (a default glyphs run) 100 steps at 1e-3 cost nothing at 5 shots
# (+0.10 +- 0.18 points) and 0.44 at 1 shot, where 3e-3 cost 0.1 and 1.8 and 1e-2 0.5 and 4.8; across domains
# (a script-split run on glyphs-negative's validation families) they gain 8-9 points at 1 and 5 shots, 3e-3
# one more, 3e-4 one less; 50 or 200 steps change little. No proximal term (the issue: it lost up to 3 points).
DEFAULT_ADAPT_STEPS = 100
DEFAULT_ADAPT_LR = 1e-3
DEFAULT_ADAPT_PROX = 0.0
#: the most folds `auto` scores per task (at <= 5 shots per class: leave one shot per class out)
AUTO_FOLDS = 5

_RANGES = {"steps": Range("adapt_steps", int, 0, BIG), "lr": Range("adapt_lr", float, 0.0, LR_MAX, open_low=True),
           "prox": Range("adapt_prox", float, 0.0, LR_MAX)}
_LIB_FLAGS = {"adapt": "adapt", "steps": "adapt_steps", "lr": "adapt_lr", "prox": "adapt_prox"}


@dataclass(frozen=True)
class AdaptSettings:
    """What test-time adaptation does (see the module docstring); steps/lr/prox None for `head`."""

    mode: str = "head"
    steps: int | None = None
    lr: float | None = None
    prox: float | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `learner.evaluate`/`adapt` for these settings ({} for head: today's call)."""
        if self.mode == "head":
            return {}
        return {"adapt": self.mode, "adapt_steps": self.steps, "adapt_lr": self.lr, "adapt_prox": self.prox}

    def record(self) -> dict[str, Any]:
        """The settings as the JSON output records them."""
        return {"adapt": self.mode, "adapt_steps": self.steps, "adapt_lr": self.lr, "adapt_prox": self.prox}


def adapt_settings(adapt: Any = "head", steps: Any = None, lr: Any = None, prox: Any = None,
                   flags: dict[str, str] | None = None) -> AdaptSettings:
    """Checked settings, defaults filled in (`DEFAULT_ADAPT_*`); `flags` names the options in errors.

    Raises:
        UsageError: one line: `adapt` not one of `ADAPT_MODES`, steps not an integer >= 0, lr not a finite
            number > 0, prox not a finite number >= 0, or any of them given with `head` (they would do nothing).

    Example:
        >>> adapt_settings("last-block", lr=0.01)
        AdaptSettings(mode='last-block', steps=100, lr=0.01, prox=0.0)
        >>> adapt_settings("head", steps=5)
        Traceback (most recent call last):
        ...
        mrml.errors.UsageError: adapt_steps does nothing with adapt head (the default: only the algorithm's own adaptation runs): drop it, or give adapt last-block, all or auto
    """
    names = {**_LIB_FLAGS, **(flags or {})}
    if not isinstance(adapt, str) or adapt not in ADAPT_MODES:
        raise UsageError(f"{names['adapt']} must be one of {', '.join(ADAPT_MODES)} (got {adapt!r})")
    given = {"steps": steps, "lr": lr, "prox": prox}
    if adapt == "head":
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise UsageError(f"{names[extra[0]]} does nothing with {names['adapt']} head (the default: only the "
                             f"algorithm's own adaptation runs): drop it, or give {names['adapt']} last-block, all "
                             "or auto")
        return AdaptSettings()
    defaults = {"steps": DEFAULT_ADAPT_STEPS, "lr": DEFAULT_ADAPT_LR, "prox": DEFAULT_ADAPT_PROX}
    values = {k: defaults[k] if v is None else v for k, v in given.items()}
    for k, v in values.items():
        _RANGES[k].check(v, names[k])
    return AdaptSettings(adapt, values["steps"], float(values["lr"]), float(values["prox"]))


class _Bound(nn.Module):
    """Holds the model so that `functional_call(self, {"model." + name: value}, (fn, x))` runs any `fn` that
    uses the model's modules with those parameter values (the model's own are untouched)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return fn(x)


@dataclass
class _Plan:
    """The fine-tuned parameters (model names) and the function split around them: rest(prefix(x))."""

    names: list[str]
    prefix: Callable[[Any], Any]
    rest: Callable[[Any], Any]
    bound: _Bound


def _identity(x: Any) -> Any:
    return x


def plan(learner: Any, part: str) -> _Plan:
    """The fine-tuning of `part` (last-block or all) for `learner`'s model, cached on the learner."""
    cache = learner.__dict__.setdefault("_finetune_plans", {})
    if part not in cache:
        cache[part] = _make_plan(learner, part)
    return cache[part]


def _make_plan(learner: Any, part: str) -> _Plan:
    model, split = learner.model, learner.split
    params = dict(model.named_parameters())
    names = resolve_inner(model, part)
    chain: list[nn.Module] | None
    if learner.prototypes:  # the embedding: the trunk of ProtoNet's split
        emb = {id(p) for p in split.trunk.parameters()}
        names = [n for n in names if id(params[n]) in emb]
        if not names:
            raise UsageError(f"adapt {part} names no parameter of {learner.name}'s embedding: use adapt all")
        whole: Callable[[Any], Any] = split.embeddings
        chain = list(split.trunk.parts) if isinstance(split.trunk, Stages) else None
    else:
        whole = model
        stages = model_stages(model)
        chain = [m for _, m in stages] if len(stages) > 1 else None
        if split.run_trunk is not None and set(names) <= set(split.model_name.values()):  # outside a user's trunk
            return _Plan(names, split.features, split.adapt, _Bound(model))
    if chain is None:
        return _Plan(names, _identity, whole, _Bound(model))
    tuned = {id(params[n]) for n in names}
    cut = next(i for i, m in enumerate(chain) if any(id(p) in tuned for p in m.parameters()))
    return _Plan(names, Stages(chain[:cut]), Stages(chain[cut:]), _Bound(model))


def _run(p: _Plan, fn: Callable[[Any], Any], values: dict[str, torch.Tensor], x: Any) -> Any:
    return functional_call(p.bound, {"model." + k: v for k, v in values.items()}, (fn, x), strict=False)


def finetuned_predictions(learner: Any, ep: Episode, part: str, s: AdaptSettings) -> torch.Tensor:
    """Query predictions after the algorithm's own adaptation and `s.steps` Adam steps on `part`, without graph."""
    p = plan(learner, part)
    model = learner.model
    with evaluation_modes(model):
        adapted = {} if learner.prototypes else learner.adapted_parameters(ep)
        stored = dict(model.named_parameters())
        start = {n: (adapted[n] if n in adapted else stored[n]).detach() for n in p.names}
        frozen = {n: v for n, v in adapted.items() if n not in start}  # adapted by the algorithm, not fine-tuned
        with torch.no_grad():
            fs = _run(p, p.prefix, frozen, ep.support_x)
            fq = _run(p, p.prefix, frozen, ep.query_x)
        ys = ep.support_y

        def output(theta: dict[str, torch.Tensor], feats: Any) -> torch.Tensor:
            return _run(p, p.rest, {**frozen, **theta}, feats)

        def objective(theta: dict[str, torch.Tensor]) -> torch.Tensor:
            out = output(theta, fs)
            if learner.prototypes:
                loss = learner.loss(prototype_logits(out, ys, out), ys)
            else:
                loss = learner.support_loss(out, ys)
            if s.prox > 0:
                loss = loss + 0.5 * s.prox * torch.stack([(theta[n] - start[n]).pow(2).sum() for n in theta]).sum()
            return loss

        theta = {n: v.clone() for n, v in start.items()}
        if s.steps > 0:
            with torch.enable_grad():
                leaves = [t.requires_grad_(True) for t in theta.values()]
                opt = torch.optim.Adam(leaves, lr=s.lr)
                for _ in range(s.steps):
                    grads = torch.autograd.grad(objective(theta), leaves, allow_unused=True)
                    for t, g in zip(leaves, grads):
                        t.grad = torch.zeros_like(t) if g is None else g
                    opt.step()
        theta = {n: t.detach() for n, t in theta.items()}
        with torch.no_grad():
            if learner.prototypes:
                return prototype_logits(output(theta, fs), ys, output(theta, fq))
            return output(theta, fq)


def _subset(x: Any, idx: torch.Tensor) -> Any:
    return pytree.tree_map(lambda t: t[idx], x)


def choose(learner: Any, ep: Episode, s: AdaptSettings) -> str:
    """`auto`'s choice for `ep` from its support set alone: head or last-block (see the module docstring)."""
    ys = ep.support_y
    if learner.loss.kind == "classification" or (ys.dim() == 1 and not ys.is_floating_point()):
        groups = [torch.nonzero(ys == c).flatten() for c in torch.unique(ys)]
    else:
        groups = [torch.arange(ys.shape[0], device=ys.device)]
    shots = min(len(g) for g in groups)
    if shots < 2:
        return "head"
    k = min(shots, AUTO_FOLDS)
    score = {"head": [0, 0.0], "last-block": [0, 0.0]}  # held-out correct count, summed loss
    for j in range(k):
        held = torch.cat([g[j::k] for g in groups])
        keep = torch.cat([torch.cat([g[i::k] for i in range(k) if i != j]) for g in groups])
        sub = Episode(_subset(ep.support_x, keep), ys[keep], _subset(ep.support_x, held), ys[held])
        for mode in score:
            pred = learner.adapt(sub) if mode == "head" else finetuned_predictions(learner, sub, mode, s)
            n = int(held.numel())
            acc = learner.loss.accuracy(pred, sub.query_y)
            score[mode][0] += 0 if acc is None else round(acc * n)
            score[mode][1] += float(learner.loss(pred, sub.query_y)) * n
    (hc, hl), (bc, bl) = score["head"], score["last-block"]
    return "last-block" if bc > hc or (bc == hc and bl < hl) else "head"


def predictions(learner: Any, ep: Episode, s: AdaptSettings) -> tuple[torch.Tensor, str]:
    """(query predictions, the adaptation used: head, last-block or all) under settings `s`."""
    mode = choose(learner, ep, s) if s.mode == "auto" else s.mode
    if mode == "head":
        return learner.adapt(ep), mode
    return finetuned_predictions(learner, ep, mode, s), mode
