"""Split a model into the trunk (outer-only, run once per image set) and the adapted part.

Inner parameters are named by a spec: `head` (default), `last-block` (last backbone block + head),
`all` (the whole network), or comma-separated name prefixes (`backbone.3,head`).

Two ways to find the trunk:
- automatic (`trunk=None`): the model's forward is a sequence of stages (`FewShotNet.stages()`, or
  the children of an `nn.Sequential`); everything before the first stage that holds an inner
  parameter is the trunk. A model that is neither is one stage: correct, but the inner loop then
  re-runs all of it -- except where the inner part is one `nn.Linear` that the forward provably
  applies once, last, to features that do not depend on it (`head_of`, checked on a torch.fx trace
  and again on every call): then the features are that layer's input (`HeadInput`, the model's forward
  run with the layer replaced by a stand-in that records its input) and the adapted part is the layer
  alone, as with an explicit trunk (learn2learn's `self.classifier(self.features(x))`);
- explicit (`trunk="features"`, a dotted submodule name or the submodule itself): any model whose
  forward calls that submodule once, with any positional and keyword arguments taken from the input
  (`self.encoder(**batch)`, `self.encoder(x, mask)`), returning a tensor or a dataclass (such as a
  Hugging Face ModelOutput), dict, list or tuple of tensors. Its features are its output on what the
  model's own forward passes to it (the forward is run up to that call and stopped there); its
  arguments must not be computed from the inner parameters (checked on the autograd graph). The rest of
  the model is the model's own forward on the input with the trunk replaced by a stand-in returning
  the precomputed output (`Rest`), so a forward `self.classifier(self.features(x))`, or one that picks
  `.last_hidden_state` and pools it with the input's attention mask, works. When the rest is exactly
  one `nn.Linear` applied to the features (checked once, by a probe), the adapted part is that layer
  alone, so the closed forms of a linear head apply (`mrml.algorithms.exact_head`, `mrml.solvers.head`). When the forward
  does more after the trunk and ends with that layer (`head_of`, the trunk traced as one opaque call),
  the features are the layer's input, as in the automatic split at a linear head above (the trunk
  still called once per forward, checked on every call).
  An inner part made of one module's parameters counts as the model's last stage (a head: by
  default ridge-regularised towards 0 from a fixed init); a wider one gets the proximal inner loss
  (`AlgoConfig.prox` overrides either).

Either way the features are computed once with gradient; the inner loop re-runs only the adapted
part on a detached copy of them. Where the inner part is one linear layer that the split cannot put
alone in the adapted part, `ModelSplit.general_reason` says why (the algorithms warn when that
changes their default estimator).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn
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


def resolve_inner(model: nn.Module, spec: str, hint: str | None = None) -> list[str]:
    """Names of the inner parameters of `model` under `spec` (`hint`: a parameter name to suggest
    a prefix of in the error, default the first)."""
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
        suggestion = (hint or names[-1]).rsplit(".", 1)[0]  # by default the last layer: usually the head
        raise UsageError(
            f"inner part {spec!r} names no parameter: use last-block, all, or name prefixes "
            f"such as {suggestion!r}" + ("" if hint else " (the model's last layer)")
        )
    return chosen


@dataclass
class ModelSplit:
    """`trunk` (outer only) then `adapt`; adapt's parameters are outer (`outer_names`) or inner.
    With an explicit trunk, `features` runs the model's forward up to the trunk (`run_trunk`)."""

    model: nn.Module
    trunk: nn.Module
    adapt: nn.Module
    inner_names: list[str]  # adapt-local names of the inner parameters
    outer_names: list[str]  # adapt-local names of the outer parameters re-run in the inner loop
    model_name: dict[str, str]  # adapt-local name -> model name
    inner_is_last_stage: bool  # the inner part lies within the model's last stage (e.g. the head)
    trunk_name: str | None = None  # the explicit trunk's name in the model (None: automatic stages)
    run_trunk: Callable[[Any], torch.Tensor] | None = None  # explicit trunk: the model's forward up to it
    #: why an inner part that is one linear layer (a head: nothing with parameters after it) is not the
    #: adapted part alone, so that no closed form applies; None otherwise
    general_reason: str | None = None

    def features(self, x: Any) -> Any:
        """What the adapted part takes on the inputs `x` (a tensor or a dict/list/tuple of tensors): the
        trunk's output; with an explicit trunk and the general `Rest`, (its tensors, x)."""
        return self.run_trunk(x) if self.run_trunk is not None else self.trunk(x)

    def embeddings(self, x: Any) -> Any:
        """The trunk's output on `x` as the model's forward computes it (ProtoNet's embeddings)."""
        run = self.run_trunk
        return run.output(x) if isinstance(run, TrunkForward) else self.features(x)

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

    def to_model_names(self, params: Params) -> Params:
        """Adapt-local names -> the model's parameter names."""
        return {self.model_name[k]: v for k, v in params.items()}


# -- explicit trunk ------------------------------------------------------------------------------
class TrunkConsumed:
    """Stands for the model's input in the probe of `_applies_linear` (no input there). Attribute access,
    calls and indexing return the placeholder itself (so `self.features(x.view(...))` or
    `self.encoder(x["ids"])` reach the stand-in); any other use is a UsageError."""

    def __getattr__(self, name: str) -> "TrunkConsumed":
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> "TrunkConsumed":
        return self

    def __getitem__(self, key: Any) -> "TrunkConsumed":
        return self

    def __iter__(self) -> Iterator[Any]:
        raise UsageError(_CONSUMED_MSG)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise UsageError(_CONSUMED_MSG)

    def __repr__(self) -> str:
        return "<input consumed by the trunk>"


_CONSUMED_MSG = "the model's forward uses its input other than by passing it to the trunk"
_CONSUMED = TrunkConsumed()


# the trunk's output as tensor leaves and a structure without tensors (`_flatten`, `_rebuild`)
_TENSOR = ("tensor",)
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


def _flatten(obj: Any, out: list[torch.Tensor]) -> tuple:
    """Append the tensors of `obj` (a tensor, or a dataclass -- a ModelOutput --, dict, list or tuple of
    them, other leaves plain values) to `out`; return its structure."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return _TENSOR
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        return ("dataclass", type(obj), names, [_flatten(getattr(obj, n), out) for n in names])
    if isinstance(obj, dict):
        return ("dict", type(obj), list(obj), [_flatten(v, out) for v in obj.values()])
    if isinstance(obj, (list, tuple)):
        return ("seq", type(obj), [_flatten(v, out) for v in obj])
    if isinstance(obj, _PLAIN):
        return ("plain", obj)
    raise UsageError(f"the trunk returned a {type(obj).__name__}: trunk= needs a tensor, or a dataclass (such as a "
                     "ModelOutput), dict, list or tuple of tensors")


def _rebuild(spec: tuple, leaves: Iterator[torch.Tensor]) -> Any:
    """The structure `spec` (from `_flatten`) with its tensors taken in order from `leaves`."""
    kind = spec[0]
    if kind == "tensor":
        return next(leaves)
    if kind == "plain":
        return spec[1]
    if kind == "dataclass":
        cls, names, parts = spec[1:]
        values = {n: _rebuild(p, leaves) for n, p in zip(names, parts)}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{n: v for n, v in values.items() if n in init})
        for n, v in values.items():
            if n not in init:
                object.__setattr__(obj, n, v)
        return obj
    if kind == "dict":
        cls, keys, parts = spec[1:]
        return cls(zip(keys, [_rebuild(p, leaves) for p in parts]))
    cls, parts = spec[1:]
    items = [_rebuild(p, leaves) for p in parts]
    return cls(*items) if hasattr(cls, "_fields") else cls(items)


def _reaches(tensors: list[torch.Tensor], targets: dict[int, str]) -> str | None:
    """The name of a tensor of `targets` (by id) that one of `tensors` was computed from (autograd graph)."""
    todo = [t for t in tensors if id(t) in targets]
    if todo:
        return targets[id(todo[0])]
    nodes, seen = [t.grad_fn for t in tensors if t.grad_fn is not None], set()
    while nodes:
        node = nodes.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) in targets:
            return targets[id(var)]
        nodes.extend(n for n, _ in node.next_functions if n is not None)
    return None


class _Given(nn.Module):
    """Stand-in for the trunk: returns the precomputed features, counts its calls."""

    def __init__(self, feats: Any):
        super().__init__()
        self.feats, self.calls = feats, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.feats


class _Reached(BaseException):
    """Raised by `_Capture` to stop the model's forward once the trunk has run (not an Exception,
    so a user's `except Exception` does not swallow it)."""

    def __init__(self, out: Any, inputs: list[torch.Tensor]):
        super().__init__()
        self.out, self.inputs = out, inputs


class _Capture(nn.Module):
    """Stand-in for the trunk that runs the real trunk on the arguments it is given, then stops."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.__dict__["real"] = trunk  # not registered: the model's module tree is unchanged

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs: list[torch.Tensor] = []
        _flatten_args((args, kwargs), inputs)
        raise _Reached(self.real(*args, **kwargs), inputs)


def _flatten_args(obj: Any, out: list[torch.Tensor]) -> None:
    """The tensors among a call's arguments (any other value ignored)."""
    try:
        _flatten(obj, out)
    except UsageError:
        pass


@contextmanager
def _swapped(model: nn.Module, path: str, module: nn.Module) -> Iterator[None]:
    parent_name, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = parent._modules[leaf]
    parent._modules[leaf] = module
    try:
        yield
    finally:
        parent._modules[leaf] = old


class TrunkForward:
    """features(x): the model's forward on `x` up to its call of the trunk, which runs as called.

    With `rest` (the general split), the features are (the trunk output's tensors, x): `rest` keeps the
    output's structure and gets the input back. The trunk's arguments must not be computed from the
    inner parameters (`inner`: id -> name; checked on the autograd graph where gradients are on)."""

    def __init__(self, model: nn.Module, path: str, trunk: nn.Module, inner: dict[int, str] | None = None,
                 rest: "Rest | None" = None):
        self.model, self.path, self.trunk = model, path, trunk
        self.inner, self.rest = inner or {}, rest

    def __call__(self, x: Any) -> Any:
        out = self.output(x)
        if self.rest is None:
            return out
        leaves: list[torch.Tensor] = []
        self.rest.spec = _flatten(out, leaves)
        return (tuple(leaves), x)

    def output(self, x: Any) -> Any:
        """The trunk's output on `x` (as it returns it)."""
        try:
            with _swapped(self.model, self.path, _Capture(self.trunk)):
                self.model(x)
        except _Reached as reached:
            name = _reaches(reached.inputs, self.inner) if self.inner else None
            if name is not None:
                raise UsageError(f"{type(self.model).__name__}.forward computes the trunk {self.path!r}'s input "
                                 f"from the inner parameter {name!r}: the trunk's features cannot depend on the "
                                 "adapted part; feed the trunk from the input and outer parameters only") from None
            return reached.out
        raise UsageError(f"{type(self.model).__name__}.forward never called the trunk {self.path!r}: "
                         "name the submodule that its forward runs on the input")


class Rest(nn.Module):
    """The model's forward after the trunk: the model's forward on the input with the trunk replaced by
    a stand-in returning the precomputed output. Its features are (the output's tensors, the input),
    as `TrunkForward` gives them; `spec` is the output's structure."""

    def __init__(self, model: nn.Module, path: str):
        super().__init__()
        self.model = model
        self.path = path
        self.spec: tuple = _TENSOR

    def run(self, out: Any, x: Any) -> Any:
        """The model's output on input `x` given the trunk's output `out`."""
        given = _Given(out)
        with _swapped(self.model, self.path, given):
            pred = self.model(x)
        if given.calls != 1:
            raise UsageError(f"{type(self.model).__name__}.forward called the trunk {self.path!r} {given.calls} times: "
                             "trunk=... needs a submodule called once per forward")
        return pred

    def forward(self, feats: tuple[tuple[torch.Tensor, ...], Any]) -> Any:
        leaves, x = feats
        return self.run(_rebuild(self.spec, iter(leaves)), x)


def resolve_trunk(model: nn.Module, trunk: str | nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the trunk given by name (dotted names allowed) or as a submodule of `model`."""
    children = ", ".join(n for n, _ in model.named_children()) or "none"
    where = f"{type(model).__name__} (its children: {children}; dotted names reach deeper)"
    if isinstance(trunk, str):
        try:
            module = model.get_submodule(trunk) if trunk else None
        except AttributeError:
            module = None
        if module is None:
            raise UsageError(f"trunk {trunk!r} is not a submodule of {where}")
        return trunk, module
    if isinstance(trunk, nn.Module):
        names = [n for n, m in model.named_modules() if m is trunk and n]
        if not names:
            raise UsageError(f"the trunk module ({type(trunk).__name__}) is not a submodule of {where}")
        return names[0], trunk
    raise UsageError(f"trunk must be a submodule name or an nn.Module inside the model (got {type(trunk).__name__})")


def linear_of(model: nn.Module, inner: list[str] | set[str]) -> tuple[str, nn.Linear] | None:
    """(name, module) of the nn.Linear whose parameters are exactly the inner ones, if any."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and {f"{name}.{n}" if name else n for n, _ in m.named_parameters()} == set(inner):
            return name, m
    return None


def _applies_linear(model: nn.Module, path: str, linear: nn.Linear) -> bool:
    """Whether the model's output is `linear` applied directly to the trunk's output (a probe on
    zero features, buffers copied so that batch-norm statistics are left alone). The probe is 3-D,
    (2, 1, in_features): a forward that reshapes the features (`flatten(1)`, `view`, `squeeze`) hands
    the linear a new tensor and is refused even where that reshape would be a no-op on 2-D features,
    so the closed forms are used only when the trunk's output reaches the linear untouched."""
    probe = torch.zeros(2, 1, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    seen: list[tuple[Any, Any]] = []
    hook = linear.register_forward_hook(lambda m, args, out: seen.append((args[0] if args else None, out)))
    rest = Rest(model, path)
    buffers = {f"model.{n}": b.clone() for n, b in model.named_buffers()
               if not (n == path or n.startswith(path + "."))}
    try:
        with torch.no_grad():
            out = functional_call(rest, buffers, (((probe,), _CONSUMED),), strict=False)
    except Exception:  # noqa: BLE001 -- any failure means "not provably a linear head": the general path
        return False
    finally:
        hook.remove()
    return len(seen) == 1 and seen[0][0] is probe and out is seen[0][1]

# -- automatic split at a linear head ------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:120] + "...") if len(text) > 120 else (text or type(e).__name__)


def _descendants(node: Any) -> list[Any]:
    seen: dict[Any, None] = {}
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen[n] = None
            todo.extend(n.users)
    return list(seen)


def head_of(model: nn.Module, path: str, linear: nn.Linear, trunk: str | None = None) -> tuple[str | None, bool]:
    """Whether the model's forward is `linear(features)` with features that cannot depend on `linear`.

    Returns (None, True) when a torch.fx trace shows the layer called once, on one positional argument,
    its output returned as is, and its parameters read nowhere else and held by no other module (the
    features are computed before the call, so they do not depend on them); else (the reason, whether
    the layer still looks like a head: no layer with parameters after it). Tracing runs the forward on
    proxies (no data), once in training and once in eval mode (the mode is restored); a forward that
    cannot be traced is not split. With an explicit `trunk` (its name), the trunk is one opaque call
    (its code is not traced) and `**input` unpacking in the forward is traced as one keyword argument
    (the input's keys are not known before it is called): what the trace checks is the head's call."""
    ids = {id(p) for p in linear.parameters()}
    holders = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]
    if len(holders) != len(ids):
        others = sorted(n for n in holders if not n.startswith(path + "."))
        return f"its parameters are shared with another layer ({', '.join(others)})", True
    modes = {m: m.training for m in model.modules()}
    try:
        for training in (True, False):  # a forward that branches on self.training: both branches
            for m in modes:  # the flags only (a custom train() may do more)
                m.training = training
            why, head_like = _traced_head(model, path, trunk)
            if why is not None:
                return why, head_like
    finally:
        for m, training in modes.items():
            m.training = training
    return None, True


class _TrunkTracer(fx.Tracer):
    """A torch.fx tracer that keeps the module `trunk` as one call and traces `**proxy` as one keyword."""

    def __init__(self, trunk: str):
        super().__init__()
        self.trunk = trunk

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.trunk or super().is_leaf_module(m, module_qualified_name)

    def keys(self, obj: fx.Proxy) -> Any:
        return ["unpacked_input"]


def _traced_head(model: nn.Module, path: str, trunk: str | None = None) -> tuple[str | None, bool]:
    """`head_of`'s check on one torch.fx trace of the model's forward (in the model's current mode)."""
    before = set(model.__dict__)
    try:
        graph = (fx.Tracer() if trunk is None else _TrunkTracer(trunk)).trace(model)
    except Exception as e:  # noqa: BLE001 -- an untraceable forward is not provably a head: the general path
        return f"the forward could not be traced to check it ({_first_line(e)})", True
    finally:
        for name in set(model.__dict__) - before:  # the tracer keeps tensor constants on the model: not ours
            delattr(model, name)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    if len(calls) != 1:
        return f"the forward calls it {len(calls)} times, not once", True
    after = _descendants(calls[0])
    params = dict(model.named_parameters())
    params_after = any((n.op == "get_attr" and n.target in params) or (n.op == "call_module" and any(
        True for _ in model.get_submodule(str(n.target)).parameters())) for n in after)
    reads = [n for n in graph.nodes if n.op == "get_attr" and (n.target == path or str(n.target).startswith(path + "."))]
    if reads:
        return "the forward reads its parameters other than by calling it", not params_after
    if len(calls[0].args) != 1 or calls[0].kwargs:
        return "the forward calls it with more than one argument", not params_after
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not calls[0]:
        return "the forward transforms its output before returning it", not params_after
    return None, True


class _Recorder(nn.Module):
    """Stand-in for the head layer: records its input, returns a placeholder output of the head's shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.inputs: list[Any] = []
        self.output: torch.Tensor | None = None

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.inputs.append(x)
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise UsageError("the model's forward called its head layer with other than one tensor, unlike when "
                             "traced: the split at a linear head needs a forward of one form (as traced)")
        self.output = x.new_zeros(*x.shape[:-1], self.out_features)
        return self.output


class HeadInput(nn.Module):
    """The features of the split at a linear head (`head_of`): the model's forward with the head replaced
    by a stand-in; its output is the head's input. Checked on every call: the head called once, on (n, d)
    features, its output returned as is; a named trunk (`trunk`: (name, module)) called once. Holds
    (shares) the model's parameters outside the head."""

    def __init__(self, model: nn.Module, path: str, linear: nn.Linear, trunk: tuple[str, nn.Module] | None = None):
        super().__init__()
        self.__dict__["model"] = model  # not registered: `held` below are the trunk's parameters
        self.__dict__["trunk"] = trunk
        self.path, self.out_features = path, linear.out_features
        head = {id(p) for p in linear.parameters()}
        self.held = nn.ParameterList([p for p in model.parameters() if id(p) not in head])

    def forward(self, x: Any) -> torch.Tensor:
        model, trunk = self.__dict__["model"], self.__dict__["trunk"]
        name, fix = type(model).__name__, "the split at a linear head needs a forward of one form (as traced)"
        stand_in = _Recorder(self.out_features)
        calls = [0]
        hook = trunk[1].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) if trunk else None
        try:
            with _swapped(model, self.path, stand_in):
                out = model(x)
        finally:
            if hook is not None:
                hook.remove()
        if trunk is not None and calls[0] == 0:
            raise UsageError(f"{name}.forward never called the trunk {trunk[0]!r}: name the submodule that its "
                             "forward runs on the input")
        if trunk is not None and calls[0] != 1:
            raise UsageError(f"{name}.forward called the trunk {trunk[0]!r} {calls[0]} times: trunk=... needs a "
                             "submodule called once per forward")
        if len(stand_in.inputs) != 1:
            raise UsageError(f"{name}.forward called {self.path!r} {len(stand_in.inputs)} times on this input (once "
                             f"when traced): {fix}")
        if out is not stand_in.output:
            raise UsageError(f"{name}.forward transformed the output of {self.path!r} on this input (not when "
                             f"traced): {fix}")
        feats = stand_in.inputs[0]
        if feats.dim() != 2:
            raise UsageError(f"{name}.forward gives {self.path!r} inputs of shape {tuple(feats.shape)}: the split at "
                             "a linear head needs (n, features); reshape them before it, or name other inner parameters")
        return feats


def head_split(model: nn.Module, path: str, linear: nn.Linear, trunk: tuple[str, nn.Module] | None = None
               ) -> ModelSplit:
    """The split whose features are the input of the head `linear` (see `head_of`), adapted part the head;
    with an explicit `trunk` (name, module), its features include what the forward does after the trunk."""
    adapt = Stages([linear])
    names = {id(p): n for n, p in model.named_parameters()}
    model_name = {n: names[id(p)] for n, p in adapt.named_parameters()}
    features = HeadInput(model, path, linear, trunk)
    return ModelSplit(model, features, adapt, list(model_name), [], model_name, True,
                      trunk[0] if trunk else None, features if trunk else None)


def explicit_split(model: nn.Module, inner: str | None, trunk: str | nn.Module) -> ModelSplit:
    """The split at an explicit trunk (see the module docstring); `inner=None`: every parameter
    outside the trunk adapts."""
    path, module = resolve_trunk(model, trunk)
    trunk_ids = {id(p) for p in module.parameters()}
    named = list(model.named_parameters())
    rest_names = [n for n, p in named if id(p) not in trunk_ids]
    if not rest_names:
        raise UsageError(f"trunk {path!r} holds every parameter of {type(model).__name__}: nothing is left to adapt")
    if inner is None:
        inner_model = rest_names
    else:
        inner_model = resolve_inner(model, inner, hint=rest_names[-1])
        inside = [n for n, p in named if n in set(inner_model) and id(p) in trunk_ids]
        if inside:
            hint = rest_names[-1].rsplit(".", 1)[0]
            raise UsageError(f"inner part {inner!r} includes parameters of the trunk {path!r} ({inside[0]}, ...): "
                             f"the trunk is outer-only; name parameters outside it, e.g. {hint!r}")
    named_linear = linear_of(model, inner_model)
    linear = named_linear[1] if named_linear is not None else None
    reason = None
    rest: Rest | None = None
    if linear is not None and _applies_linear(model, path, linear):
        adapt: nn.Module = Stages([linear])
        in_last = True
    else:
        if named_linear is not None:  # the forward does more after the trunk: a head at the end of it?
            why, head_like = head_of(model, *named_linear, trunk=path)
            if why is None:
                return head_split(model, *named_linear, trunk=(path, module))
            reason = f"{why} (layer {named_linear[0]!r})" if head_like else None
        # the inner part counts as the last stage (a head) when it is the parameters of one module
        adapt = rest = Rest(model, path)
        in_last = len({n.rpartition(".")[0] for n in inner_model}) == 1
    by_id = {id(p): n for n, p in named}
    model_name = {n: by_id[id(p)] for n, p in adapt.named_parameters() if id(p) not in trunk_ids}
    inner_set = set(inner_model)
    inner_names = [n for n, m in model_name.items() if m in inner_set]
    outer_names = [n for n, m in model_name.items() if m not in inner_set]
    inner_ids = {id(p): n for n, p in named if n in inner_set}
    return ModelSplit(model, module, adapt, inner_names, outer_names, model_name, in_last, path,
                      TrunkForward(model, path, module, inner_ids, rest), reason)


def split_model(model: nn.Module, inner: str | None = "head", recompute: bool = False,
                trunk: str | nn.Module | None = None, head_split_ok: bool = True) -> ModelSplit:
    """Split `model` into a trunk (run once per input set) and an adapted part.

    Args:
        model: the network.
        inner: which parameters adapt per task (a spec: head, last-block, all, or name prefixes);
            None only with `trunk`: every parameter outside the trunk.
        recompute: put every stage in the adapted part (no trunk; automatic split only).
        trunk: None for the automatic stages; else a submodule name of `model` (dotted names allowed)
            or the submodule itself, called once by the model's forward (see the module docstring).
        head_split_ok: whether the automatic split may cut at a linear head's input (`head_of`) where the
            stages do not put the head alone in the adapted part (False: the stages only).

    Returns:
        The `ModelSplit`.

    Raises:
        UsageError: an unknown trunk, an inner spec naming no parameter or parameters of the trunk.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
        ...         self.classifier = nn.Linear(16, 5)
        ...     def forward(self, x):
        ...         return self.classifier(self.features(x))
        >>> split = split_model(Net(), "classifier", trunk="features")
        >>> split.features(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 16])
        >>> sorted(split.model_name.values())
        ['classifier.bias', 'classifier.weight']
    """
    if trunk is not None:
        if recompute:
            raise UsageError("recompute_features re-runs the whole network in every inner step, which an "
                             "explicit trunk rules out: drop trunk=... or recompute_features")
        return explicit_split(model, inner, trunk)
    if inner is None:
        raise UsageError("inner part None needs an explicit trunk: give an inner spec (head, last-block, all, prefixes)")
    inner_model_names = set(resolve_inner(model, inner))
    stages = model_stages(model)
    cut = len(stages) - 1
    for i, (_, m) in enumerate(stages):
        if any(id(p) in {id(q) for n, q in model.named_parameters() if n in inner_model_names} for p in m.parameters()):
            cut = i
            break
    if recompute:
        cut = 0
    trunk_mod = Stages([m for _, m in stages[:cut]])
    adapt = Stages([m for _, m in stages[cut:]])
    by_id = {id(p): n for n, p in model.named_parameters()}
    model_name = {n: by_id[id(p)] for n, p in adapt.named_parameters()}
    inner_names = [n for n in model_name if model_name[n] in inner_model_names]
    outer_names = [n for n in model_name if model_name[n] not in inner_model_names]
    last = {id(p) for p in stages[-1][1].parameters()}
    in_last = all(id(p) in last for n, p in model.named_parameters() if n in inner_model_names)
    reason = None
    named_linear = linear_of(model, inner_model_names)
    if named_linear is not None and not (len(adapt.parts) == 1 and adapt.parts[0] is named_linear[1]):
        path, linear = named_linear
        if recompute:
            reason, head_like = "recompute_features re-runs the whole network in the inner loop", True
        elif not head_split_ok:
            reason, head_like = "the stages of the model do not end with it", True
        else:
            reason, head_like = head_of(model, path, linear)
            if reason is None:
                return head_split(model, path, linear)
        reason = f"{reason} (layer {path!r})" if head_like else None
    return ModelSplit(model, trunk_mod, adapt, inner_names, outer_names, model_name, in_last, general_reason=reason)
