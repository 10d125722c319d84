"""Split a model into the trunk (outer-only, run once per image set) and the adapted part.

Inner parameters are named by a spec: `head` (default), `last-block` (last backbone block + head),
`all` (the whole network), or comma-separated name prefixes (`backbone.3,head`). The model's forward
is a sequence of stages (`FewShotNet.stages()`, or the children of an `nn.Sequential`); everything
before the first stage that holds an inner parameter is the trunk. Its features are computed once
with gradient; the inner loop re-runs only the adapted part on a detached copy of them. A model that
is neither is one stage: correct, but the inner loop then re-runs all of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UsageError

Params = dict[str, torch.Tensor]


class Stages(nn.Module):
    """A sequence of modules applied in order (shares the modules, copies nothing)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.parts:
            x = m(x)
        return x


def model_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if hasattr(model, "stages"):
        return list(model.stages())
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    return [("", model)]


def resolve_inner(model: nn.Module, spec: str) -> list[str]:
    """Names of the inner parameters of `model` under `spec`."""
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if spec == "last-block":
        stages = [(p, m) for p, m in model_stages(model) if any(True for _ in m.parameters())]
        if len(stages) < 2:
            raise UsageError("inner part 'last-block' needs a model with at least two stages holding parameters")
        prefixes = [stages[-2][0], stages[-1][0]]
    else:
        prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") or p == "" for p in prefixes)]
    if not chosen:
        raise UsageError(
            f"inner part {spec!r} names no parameter: use head, last-block, all, or name prefixes "
            f"such as {names[0].rsplit('.', 1)[0]!r}"
        )
    return chosen


@dataclass
class ModelSplit:
    """`trunk` (outer only) then `adapt`; adapt's parameters are outer (`outer_names`) or inner."""

    model: nn.Module
    trunk: nn.Module
    adapt: nn.Module
    inner_names: list[str]  # adapt-local names of the inner parameters
    outer_names: list[str]  # adapt-local names of the outer parameters re-run in the inner loop
    model_name: dict[str, str]  # adapt-local name -> model name
    inner_is_last_stage: bool  # the inner part lies within the model's last stage (e.g. the head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def inner_init(self) -> Params:
        ps = dict(self.adapt.named_parameters())
        return {n: ps[n] for n in self.inner_names}

    def adapt_outer(self) -> Params:
        ps = dict(self.adapt.named_parameters())
        return {n: ps[n] for n in self.outer_names}

    def predict(self, params: Params, feats: torch.Tensor) -> torch.Tensor:
        """Run the adapted part with explicit parameters (inner and outer-in-adapt)."""
        return functional_call(self.adapt, params, (feats,), strict=False)

    def inner_parameters(self) -> list[nn.Parameter]:
        ps = dict(self.adapt.named_parameters())
        return [ps[n] for n in self.inner_names]  # type: ignore[misc]


def split_model(model: nn.Module, inner: str = "head", recompute: bool = False) -> ModelSplit:
    """Split `model` by the inner spec; `recompute=True` puts every stage in the adapted part."""
    inner_model_names = set(resolve_inner(model, inner))
    stages = model_stages(model)
    cut = len(stages) - 1
    for i, (_, m) in enumerate(stages):
        if any(id(p) in {id(q) for n, q in model.named_parameters() if n in inner_model_names} for p in m.parameters()):
            cut = i
            break
    if recompute:
        cut = 0
    trunk = Stages([m for _, m in stages[:cut]])
    adapt = Stages([m for _, m in stages[cut:]])
    by_id = {id(p): n for n, p in model.named_parameters()}
    model_name = {n: by_id[id(p)] for n, p in adapt.named_parameters()}
    inner_names = [n for n in model_name if model_name[n] in inner_model_names]
    outer_names = [n for n in model_name if model_name[n] not in inner_model_names]
    last = {id(p) for p in stages[-1][1].parameters()}
    in_last = all(id(p) in last for n, p in model.named_parameters() if n in inner_model_names)
    return ModelSplit(model, trunk, adapt, inner_names, outer_names, model_name, in_last)
