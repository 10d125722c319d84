"""Task-batched Algorithm 1: the tasks of a chunk go through every phase of `MRML.task_gradient` at once.

Per chunk of C episodes of equal shapes (stacked along a new leading task dimension):
- trunk: support and query sets separately, with gradient, batch norm taking its statistics per task
  (and per image set) exactly as in the per-task form. Trunks built of modules known to act image by
  image (Conv-4, ResNet-12, MLPs: `task_grouped_copy`) run as one image-major batch of C x N images
  whose batch norms normalise each (task, channel) separately (`TaskBatchNorm`: what vmap's batch-norm
  rule computes, without its copies -- the same memory per task as the per-task form, and faster);
  any other trunk runs under `torch.func.vmap` over tasks of `functional_call(trunk, params, x)`
  (`config.extra["trunk_batching"] = "vmap"` forces that). On CPU the trunk runs task by task, its
  features stacked (`"tasks"`, what `"auto"`, the default, picks there): one big batch of C x N images
  measured slower on a CPU than C batches of N (benchmarks/engine.py, README), while everything after
  the trunk stays batched. An explicit `trunk=` runs through the model's own forward
  (`ModelSplit.run_trunk`) task by task, its features stacked;
- the default form (a linear head solved by Newton, `MRML.exact_head`) then goes to
  `exact_head.head_step` on the chunk: the per-task loop's own code, with T = C tasks instead of 1;
- any other form goes through the functional core (`mrml.functional`) with `batched=True`: g and f are the per-task losses
  under `torch.func.vmap` (one value per task), differentiated with ordinary autograd -- the per-task
  gradients are those of sum_c g_c, as g_c depends on y_c alone:
  - inner loop `solve_inner`: K steps on the detached features, the per-task inner variables stacked
    along the leading dim (no graph is kept), with the per-task form's divergence guard decided task
    by task (`descend_tasks`: masks, no host synchronisation per step);
  - `hypergradient`: right-hand side d_y f, conjugate gradient on (C, n) flat rows, each row solved
    independently (it stops at tolerance), Hessian-vector products from the graph of d_y sum_c g_c
    built once (block diagonal over tasks: row c gets H_c v_c); the surrogate
    sum_c f_c(x, y_K) - <d_y g_c(x, y_K), v_c> (create_graph for d_y g, as the per-task form does),
    backpropagated once into the `.grad` of the model parameters.
  (Forward over reverse, vmap(jvp(grad(g))), would recompute the graph every product and hits a
  ZeroTensor error in the MSE loss's forward-mode derivative in torch 2.13; torch.func.grad inside
  vmap is avoided for the surrogate: its batch-norm backward rule gives a wrong gradient with respect
  to the input under outer autograd, pytorch/functorch#534.)

`MRML.meta_gradient` comes here when `task_chunk` > 1, or when `amp` or `compile` is set (then in
chunks of `task_chunk`, possibly 1). A model whose batch norm updates running statistics in training
falls back to the per-task loop with a warning (per-task updates of shared buffers cannot be batched).

The hypergradient and the statistics equal the per-task form's up to rounding. `task_chunk` C trades
memory for speed: the trunk's activations of C tasks are alive at once. On CPU chunks gain little (the
trunk runs task by task there, see above; the per-task loop stays the default); chunking is for GPUs,
where the per-task loop is bound by kernel launches of tiny inner-loop operations.

`AlgoConfig.amp` autocasts the trunk forward (`mrml.precision`); `AlgoConfig.compile` compiles the
batched trunk with `torch.compile` (backend `config.extra["compile_backend"]`, default "inductor";
mode `config.extra["compile_mode"]`), each new input shape checked once with a forward and backward
pass, and falls back to eager execution with a warning when compilation fails. Shapes are static:
support and query sets, and a last chunk smaller than `task_chunk`, each compile once (inductor on
CPU takes minutes; on CUDA it is a one-time cost per shape).
"""
from __future__ import annotations

import copy as _copy
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .. import functional as fn
from .. import pytree
from ..errors import UsageError
from ..data.base import Episode
from ..models.split import Params, Stages
from ..precision import amp_dtype, autocast
from .base import AlgoConfig, MetaAlgorithm, StepStats, detached, mean_stats
from .exact_head import damping_shift

if TYPE_CHECKING:  # pragma: no cover  (typing only: mrml.py imports this module, not the reverse)
    from .mrml import MRML


# -- the trunk over a chunk of tasks -------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class TaskBatchNorm(nn.Module):
    """Batch norm with statistics per task on an image-major flat batch: row n * C + c is image n of
    task c, so the (N, C * channels, ...) view is free and F.batch_norm normalises each (task, channel)
    by its own statistics -- what batch norm does on one task's images. Wraps (shares) `bn`."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, ctx: SimpleNamespace):
        super().__init__()
        self.bn = bn
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, groups = self.bn, self.ctx.groups
        if groups == 1 or not (bn.training or bn.running_mean is None):  # running statistics: per image
            return bn(x)
        if bn.track_running_stats and bn.training:
            raise RuntimeError("task-batched batch norm cannot update running statistics per task")
        xv = x.reshape(x.shape[0] // groups, groups * x.shape[1], *x.shape[2:])
        w = bn.weight.repeat(groups) if bn.weight is not None else None
        b = bn.bias.repeat(groups) if bn.bias is not None else None
        return F.batch_norm(xv, None, None, w, b, True, 0.0, bn.eps).reshape(x.shape)


def _per_image_modules() -> frozenset[type]:
    """Module classes whose forward acts on each image alone (batch norm aside), by exact class: a
    subclass may override forward."""
    from ..models.resnet import ResBlock

    return frozenset({
        nn.Sequential, nn.ModuleList, Stages, ResBlock, nn.Identity, nn.Flatten, nn.Unflatten, nn.Linear, nn.Bilinear,
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
        nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
        nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    })


def task_grouped_copy(trunk: nn.Module) -> tuple[nn.Module, SimpleNamespace] | None:
    """A copy of `trunk` that shares its parameters and buffers, with each batch norm replaced by a
    `TaskBatchNorm`; None when the trunk holds a module not known to act image by image (batch norm
    aside) -- then the trunk is vmapped instead."""
    allowed = _per_image_modules()
    if not all(type(m) in allowed for m in trunk.modules()):
        return None
    memo = {id(t): t for t in list(trunk.parameters()) + list(trunk.buffers())}
    copy = _copy.deepcopy(trunk, memo)
    ctx = SimpleNamespace(groups=1)
    originals = dict(trunk.named_modules())
    for name, m in list(copy.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                full = f"{name}.{child_name}" if name else child_name
                setattr(m, child_name, TaskBatchNorm(originals[full], ctx))
    return copy, ctx


class BatchedTrunk:
    """The trunk over (C, N, ...) inputs, with gradient, batch norm per task; optional autocast and
    torch.compile. Trunks built of modules known to act image by image (Conv-4, ResNet-12, MLPs) run
    as one image-major flat batch with task-wise batch norm (`TaskBatchNorm`); others under vmap. An
    explicit trunk= (`run`: `ModelSplit.run_trunk`, the model's forward up to the trunk) runs task by
    task, its features stacked: the model's forward is the user's code, not a module vmap can batch."""

    def __init__(self, trunk: nn.Module, amp: str | None = None, compile: bool = False,
                 backend: str | Callable = "inductor", mode: str | None = None, grouped: bool = True,
                 run: Callable[[Any], Any] | None = None, by_task: str = "auto"):
        self.trunk = trunk
        self.run = run
        self.by_task = by_task  # "tasks": always task by task; "auto": on CPU; anything else: never
        grouped = grouped and run is None
        self.amp = amp
        self.requested_compile = compile
        amp_dtype(amp)  # validate early
        self.empty = isinstance(trunk, Stages) and len(trunk.parts) == 0  # recompute_features: no trunk
        made = task_grouped_copy(trunk) if grouped and not self.empty else None
        self.grouped, self.ctx = made if made is not None else (None, SimpleNamespace(groups=1))
        self.compiled: Callable | None = None
        self.checked: set[tuple] = set()
        if compile and not self.empty:
            try:
                self.compiled = torch.compile(self.forward, dynamic=False, backend=backend, mode=mode)
            except Exception as e:  # e.g. an unsupported platform
                warnings.warn(f"torch.compile unavailable ({_first_line(e)}); running the trunk eagerly", stacklevel=3)

    def forward(self, params: Params, x: Any) -> torch.Tensor:
        with autocast(pytree.leaves(x)[0].device, self.amp):
            device = pytree.leaves(x)[0].device
            if self.run is not None or self.by_task == "tasks" or (self.by_task == "auto" and device.type == "cpu"):
                run = self.run if self.run is not None else self.trunk
                tasks = range(pytree.leading_size(x))
                return pytree.stack([run(pytree.tree_map(lambda t: t[c], x)) for c in tasks])
            if self.grouped is not None and isinstance(x, torch.Tensor):  # nested inputs: vmap below
                C, N = x.shape[:2]
                flat_x = x.transpose(0, 1).reshape(N * C, *x.shape[2:])  # image-major
                out = self.grouped(flat_x)
                return out.reshape(N, C, *out.shape[1:]).transpose(0, 1)

            def one(xc: Any) -> torch.Tensor:
                return functional_call(self.trunk, params, (xc,), strict=False)

            return vmap(one, randomness="different")(x)

    def _sync_modes(self) -> None:
        if self.grouped is not None:
            for m, o in zip(self.grouped.modules(), self.trunk.modules()):
                if not isinstance(m, TaskBatchNorm):
                    m.training = o.training

    def __call__(self, x: Any, dtype: torch.dtype) -> Any:
        """The trunk on x: (C, N, ...) stacked tasks, a tensor or a dict/list/tuple of them."""
        if self.empty:
            return x
        params = dict(self.trunk.named_parameters())
        self.ctx.groups = pytree.leading_size(x)
        self._sync_modes()
        if self.compiled is not None:
            key = (tuple((tuple(t.shape), t.dtype, t.device) for t in pytree.leaves(x)), torch.is_grad_enabled())
            if key not in self.checked:
                try:  # compile forward and backward now, so a failure cannot strike mid-step
                    out = self.compiled(params, x)
                    needs = [p for p in params.values() if p.requires_grad]
                    if needs and out.requires_grad:
                        torch.autograd.grad(out.float().sum(), needs, allow_unused=True)
                    self.checked.add(key)
                except Exception as e:  # no C compiler, unsupported op, ...
                    warnings.warn(f"torch.compile of the trunk failed ({_first_line(e)}); running it eagerly",
                                  stacklevel=3)
                    self.compiled = None
            if self.compiled is not None:
                return _cast(self.compiled(params, x), dtype)
        return _cast(self.forward(params, x), dtype)


def _cast(feats: Any, dtype: torch.dtype) -> Any:
    """The floating-point tensors of `feats` (a tensor or a tree: an explicit trunk's) cast to `dtype`."""
    return pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, feats)


# -- Algorithm 1 on a chunk ------------------------------------------------------------------------
def _has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
               for m in model.modules())


def _shape_key(ep: Episode) -> tuple:
    xs, qs = pytree.leaves(ep.support_x), pytree.leaves(ep.query_x)
    return (tuple(tuple(t.shape) for t in xs), tuple(tuple(t.shape) for t in qs), tuple(ep.support_y.shape),
            tuple(ep.query_y.shape), tuple(t.dtype for t in xs), ep.support_y.dtype, xs[0].device)


def chunks(episodes: list[Episode], size: int) -> list[list[int]]:
    """Consecutive runs of at most `size` episodes of equal shapes (indices)."""
    out: list[list[int]] = []
    for i, ep in enumerate(episodes):
        if out and len(out[-1]) < size and _shape_key(episodes[out[-1][0]]) == _shape_key(ep):
            out[-1].append(i)
        else:
            out.append([i])
    return out


#: how the task-batched path runs the trunk (`config.extra["trunk_batching"]`): "auto" (task by task on
#: CPU, one grouped batch elsewhere), "grouped", "vmap", "tasks"
TRUNK_BATCHING = ("auto", "grouped", "vmap", "tasks")


class TaskBatched:
    """Runs `MRML.meta_gradient` chunk by chunk (held by the algorithm; see the module docstring)."""

    def __init__(self, algo: "MRML"):
        self.algo = algo
        self.signature = self.settings(algo.config)
        amp, compile, backend, mode, batching = self.signature
        if batching not in TRUNK_BATCHING:
            raise UsageError(f"config.extra['trunk_batching'] must be one of {', '.join(TRUNK_BATCHING)} "
                             f"(got {batching!r})")
        self.trunk = BatchedTrunk(algo.split.trunk, amp, compile, backend=backend, mode=mode,
                                  grouped=batching in ("auto", "grouped"), run=algo.split.run_trunk, by_task=batching)
        self.warned = False

    @staticmethod
    def settings(cfg: AlgoConfig) -> tuple:
        """What the runner is built from: amp, compile, compile backend and mode, trunk batching."""
        return (cfg.amp, cfg.compile, cfg.extra.get("compile_backend", "inductor"), cfg.extra.get("compile_mode"),
                cfg.extra.get("trunk_batching", "auto"))

    def meta_gradient(self, episodes: list[Episode], task_ids: list[Any] | None = None,
                      scale: float | None = None, chunk: int | None = None, accumulate: bool = False,
                      check_finite: bool = True) -> StepStats:
        algo = self.algo
        if _has_running_stats(algo.model):
            if not self.warned:
                warnings.warn("the model has batch norm updating running statistics (per-task updates cannot be "
                              "batched): using the per-task loop", stacklevel=3)
                self.warned = True
            return MetaAlgorithm.meta_gradient(algo, episodes, task_ids, scale, accumulate=accumulate,
                                               check_finite=check_finite)
        scale, ids, watch = algo.begin_step(episodes, task_ids, scale, accumulate, check_finite)
        size = max(1, int(chunk if chunk is not None else algo.config.task_chunk))
        per_task: list[StepStats] = []
        for idx in chunks(episodes, size):
            rows: list[torch.Tensor] = []
            per_task += self.chunk_gradient([episodes[i] for i in idx], [ids[i] for i in idx], scale, rows)
            if watch is not None:
                watch.done(idx, rows[0])
        if watch is not None:
            watch.check(per_task)
        return mean_stats(per_task)

    def chunk_gradient(self, eps: list[Episode], ids: list[Any], scale: float,
                       finite_rows: list[torch.Tensor] | None = None) -> list[StepStats]:
        """Accumulate scale x the hypergradient of each task of `eps` (equal shapes) into `.grad`; appends
        to `finite_rows` a (len(eps),) bool tensor: each task's inner solution and linear-system solution
        finite (no sync)."""
        algo, cfg, split = self.algo, self.algo.config, self.algo.split
        sx, qx = pytree.stack([ep.support_x for ep in eps]), pytree.stack([ep.query_x for ep in eps])
        sy, qy = torch.stack([ep.support_y for ep in eps]), torch.stack([ep.query_y for ep in eps])
        init = split.inner_init()
        dtype = next(iter(init.values())).dtype

        # trunk once per image set, with gradient, all tasks of the chunk at once
        fs, fq = self.trunk(sx, dtype), self.trunk(qx, dtype)
        if algo.exact_head:  # the default form: the per-task loop's code on the chunk (exact_head)
            return algo.exact_head_gradient(fs, fq, sy, qy, ids, scale, finite_rows)
        xa = split.adapt_outer()
        xa_d = detached(xa)

        def g(x: Params, y: Params, batch: tuple) -> torch.Tensor:  # one value per task
            feats, labels, centre, lam = batch
            return vmap(lambda yc, fc, lc: algo.inner_loss(x, yc, fc, lc, centre, lam))(y, feats, labels)

        def f(x: Params, y: Params, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
            feats, labels = batch
            return vmap(lambda yc, fc, lc: algo.outer_objective(x, yc, (fc, lc)))(y, feats, labels)

        warm = [algo._warm.get(t) if (cfg.warm_start and t is not None) else None for t in ids]
        y0 = pytree.stack([w[0] if w is not None else detached(init) for w in warm])
        y, inner = fn.solve_inner(g, xa_d, y0, (pytree.detach(fs), sy, algo.centre(False), None), solver="gd",
                                  steps=cfg.inner_steps, lr=cfg.inner_lr, guard=not cfg.plain_inner, batched=True)
        v0 = None
        if any(w is not None for w in warm):
            n = sum(t[0].numel() for t in y.values())
            v0 = torch.stack([w[1] if w is not None else y[next(iter(y))].new_zeros(n) for w in warm])
        damping = lr_rows = None  # the K-step systems, per task (each task's guard may have halved its step)
        if cfg.implicit in ("damped", "neumann"):
            lr_rows = inner.rows["lr"].to(dtype).unsqueeze(1)
            if cfg.implicit == "damped":
                damping = damping_shift(lr_rows, cfg.inner_steps, algo.l2_value())
        surrogate, info = fn.hypergradient(g, f, xa, y, inner_batch=(fs, sy, algo.centre(True), algo.l2_attached()),
                                           outer_batch=(fq, qy), implicit=cfg.implicit, damping=damping, lr=lr_rows,
                                           steps=cfg.inner_steps, cg_steps=cfg.cg_steps, cg_tol=cfg.cg_tol, v0=v0,
                                           inner_info=inner, has_aux=True, batched=True, return_surrogate=True,
                                           check=False,  # Algorithm 1 truncates the solves on purpose
                                           cg_hint=algo.cg_hint)
        (scale * surrogate).backward()

        v = fn.flatten(info.v, batched=True)
        if finite_rows is not None:
            finite_rows.append(torch.isfinite(v).all(-1) & torch.isfinite(fn.flatten(y, batched=True)).all(-1))
        if cfg.warm_start:
            for c, t in enumerate(ids):
                if t is not None:
                    algo._warm[t] = ({k: t_[c].clone() for k, t_ in y.items()}, v[c].clone())
        rows = info.solve.rows  # per task: iterations, residual, bad (non-positive curvature)
        table = [info.outer_loss.detach(), rows["iterations"], rows["residual"], rows["bad"], inner.rows["lr"],
                 inner.rows["grad_norm"]]
        task_accs = algo.loss.accuracies(info.aux.detach(), qy)
        if task_accs is not None:
            table.append(task_accs)
        read = torch.stack([t.to(torch.float64) for t in table]).tolist()  # the chunk's one host read
        losses, its, res, bad, lrs, norms = read[:6]
        accs: list[float | None] = read[6] if task_accs is not None else [None] * len(eps)
        algo.cg_hint = algo.cg_hints.push(int(max(its)))
        return [
            StepStats(losses[c], accs[c], {
                "cg_iterations": its[c], "cg_residual": res[c], "nonpositive_curvature": bad[c],
                "inner_lr": lrs[c], "inner_iterations": float(cfg.inner_steps),
                "inner_grad_norm": norms[c], "inner_capped": 0.0, "inner_stalled": 0.0,
            })
            for c in range(len(eps))
        ]


def batched_meta_gradient(algo: "MRML", episodes: list[Episode], task_ids: list[Any] | None = None,
                          scale: float | None = None, chunk: int | None = None, *,
                          accumulate: bool = False, check_finite: bool = True) -> StepStats:
    """`MRML.meta_gradient` in chunks of `chunk` (default `config.task_chunk`) tasks; see the module docstring.
    `accumulate=True` adds to the existing `.grad` instead of zeroing it first; `check_finite` as for
    `MetaAlgorithm.meta_gradient` (one host synchronisation per call, per-task flags within a chunk)."""
    runner = getattr(algo, "_task_batched", None)
    if runner is None or runner.signature != TaskBatched.settings(algo.config):
        runner = TaskBatched(algo)
        algo._task_batched = runner  # type: ignore[attr-defined]
    return runner.meta_gradient(episodes, task_ids, scale, chunk, accumulate, check_finite)
