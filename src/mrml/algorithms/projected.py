"""mrml's meta-trained wider form (`config.project_head`): the last block (or more) + the head, head solved exactly.

Inner variable y = (phi, W): the adapted part's body phi (e.g. the last block) and its linear head W, inner loss
g(x, phi, W) = support loss + (lam/2) (||W||^2 + ||phi - phi0||^2) (`prox`: the body's learned init phi0 as
its centre; `--no-prox`: centre 0). Per task, on detached trunk features:

1. variable projection: W0 = argmin_W g(x, phi0, W), the head solved exactly on the body's output at phi0
   (`newton_heads`, as the default form solves it), so the steps start on the head's optimum;
2. K gradient steps on (phi, W) from (phi0, W0) (`solve_inner`'s gd, with its divergence guard), no graph;
3. the hypergradient of F(x) = f(x, y_K(x)) -- the K-step problem, its start included -- estimated at y_K
   (`mrml.kstep`): v ~ alpha sum_{j<K} (I - alpha H)^j d_y f by `implicit` neumann (default) or damped, the
   start's adjoint a0 = d_y f - H v; the surrogate
   f(x, y_K) - <d_y g(x, y_K), v> + <a0_phi, phi0> - <d_W g0(x, W0), U>,  U = (d2g0/dW2)^{-1} a0_W,
   (g0 the head's loss at phi0: the last term is a0_W' dW0/dx, by the implicit function theorem on step 1)
   is backpropagated once: into the trunk, the body's init phi0 (start and centre) and lambda.

Exact when g is quadratic in y along the steps (H constant) and no step was halved; otherwise an estimate
(tests/test_wider_meta.py measures it against backpropagation through the K steps). Memory does not depend on
K. Test time: steps 1-2 with `test_steps` steps at `test_lr`. Per task only (no task-batched path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from .. import functional as fn
from ..data.base import Episode
from ..errors import UsageError
from ..kstep import k_step_adjoints
from ..models.split import Params, Stages
from ..pytree import detach, unflatten
from ..solvers.head import HeadLayout, HeadProblem, default_fallback, newton_heads
from .base import StepStats, detached, host_floats
from .exact_head import damping_shift
from .losses import LOSS_KINDS

if TYPE_CHECKING:  # pragma: no cover
    from .mrml import MRML

#: the systems the form takes (`config.implicit`; neumann by default)
PROJECTED_SYSTEMS = ("neumann", "damped", "cg")


@dataclass
class Projection:
    """The adapted part split at its head: `body` (the stages before it), the head's adapt-local names and layout."""

    body: nn.Module
    head_names: list[str]
    layout: HeadLayout

    def body_names(self, y: Params) -> list[str]:
        return [k for k in y if k not in self.head_names]


def make_projection(algo: "MRML") -> Projection:
    """Check that `algo` can run the form and split its adapted part; one-line UsageError otherwise."""
    split, cfg = algo.split, algo.config
    adapt = split.adapt
    if isinstance(adapt, Stages) and len(adapt.parts) == 1:
        raise UsageError(f"--project-head needs an inner part wider than the head, holding it (got --inner "
                         f"{cfg.inner!r}): use --inner last-block or all")
    if not (isinstance(adapt, Stages) and len(adapt.parts) > 1 and isinstance(adapt.parts[-1], nn.Linear)):
        raise UsageError("--project-head needs the adapted part to end in a linear head after at least one stage "
                         "(the built-in backbones, an nn.Sequential ending in nn.Linear, or a model with stages()); "
                         "an explicit trunk= is not supported: drop --project-head")
    last = len(adapt.parts) - 1
    head_names = [n for n, _ in adapt.named_parameters() if n.startswith(f"parts.{last}.")]
    if not set(head_names) <= set(split.inner_names) or len(split.inner_names) == len(head_names):
        raise UsageError(f"--project-head needs an inner part wider than the head, holding it (got --inner "
                         f"{cfg.inner!r}): use --inner last-block or all")
    if split.outer_names:
        raise UsageError(f"--project-head adapts the whole adapted part: --inner {cfg.inner!r} leaves parameters "
                         f"{split.outer_names[:2]} of it outer; use --inner last-block or all")
    if algo.loss.kind not in LOSS_KINDS or algo.support_loss != algo.loss:
        raise UsageError("--project-head solves the head in closed form: it needs one built-in loss "
                         "('classification' or 'regression') for the inner and outer loss")
    if cfg.inner_solver != "gd":
        raise UsageError(f"--project-head takes K gradient steps after the head solve: --inner-solver gd "
                         f"(got {cfg.inner_solver!r})")
    if cfg.implicit not in PROJECTED_SYSTEMS:
        raise UsageError(f"--project-head takes --implicit {' or '.join(PROJECTED_SYSTEMS)} (got {cfg.implicit!r}): "
                         "neumann, its default, is the K steps' own hypergradient")
    if not cfg.l2 > 0:
        raise UsageError(f"--project-head solves the head exactly: it needs --l2 > 0 (got {cfg.l2})")
    if cfg.batched:
        raise UsageError("--project-head runs per task: drop --task-chunk, --amp and --compile")
    if cfg.warm_start:
        raise UsageError("--project-head starts every task from the learned init: drop --warm-start")
    params = dict(adapt.named_parameters())
    return Projection(Stages(list(adapt.parts[:-1])), head_names, HeadLayout({n: params[n] for n in head_names}))


def head_inputs(p: Projection, params: Params, feats: Any) -> torch.Tensor:
    """The head's inputs: the body run with `params` (adapt-local names; the head's are ignored)."""
    return functional_call(p.body, {k: v for k, v in params.items() if k not in p.head_names}, (feats,), strict=False)


def head_problem(algo: "MRML", p: Projection, inputs: torch.Tensor, labels: torch.Tensor,
                 lam: torch.Tensor | float) -> HeadProblem:
    """g restricted to the head at the given body (ridge centre 0), one task stacked as T = 1."""
    return HeadProblem.build(inputs.unsqueeze(0), labels.unsqueeze(0), algo.loss.kind, lam,
                             p.layout.bias is not None, None, default_fallback(inputs.device))


def centre(algo: "MRML", p: Projection, attached: bool) -> Params:
    """The regulariser's centre: the body's init (`prox`; else 0) and 0 for the head."""
    init = algo.split.inner_init()
    out = {}
    for k, v in init.items():
        keep = algo.prox and k not in p.head_names
        out[k] = (v if attached else v.detach()) if keep else torch.zeros_like(v).detach()
    return out


def start(algo: "MRML", p: Projection, xa: Params, feats: Any, labels: torch.Tensor,
          ) -> tuple[Params, torch.Tensor, HeadProblem, Any]:
    """Step 1 without graph: (y0 = (phi0, W0), W0 as a (1, C, d+1) matrix, the head problem at phi0, Newton's record)."""
    init = detached(algo.split.inner_init())
    with torch.no_grad():
        inputs = head_inputs(p, {**xa, **init}, detach(feats))
    problem = head_problem(algo, p, inputs, labels, algo.l2_value())
    w0 = p.layout.matrix({k: init[k] for k in p.head_names}).unsqueeze(0)
    w, info = newton_heads(problem, w0, fn.NEWTON_STEPS, algo.config.inner_tol)
    return {**init, **p.layout.params(w[0])}, w, problem, info


def adapted_inner(algo: "MRML", p: Projection, xa: Params, feats: Any, labels: torch.Tensor, steps: int,
                  lr: float) -> Params:
    """Steps 1-2: the head solved at phi0, then `steps` gradient steps of size `lr` on (phi, W), without graph."""
    y0, _, _, _ = start(algo, p, xa, feats, labels)
    return algo.solve_inner(xa, y0, detach(feats), labels, steps, lr, centre(algo, p, False))


def task_gradient(algo: "MRML", p: Projection, ep: Episode, scale: float) -> StepStats:
    """Accumulate `scale` x this task's estimated K-step hypergradient into `.grad` (module docstring)."""
    cfg, split = algo.config, algo.split
    fs, fq = split.features(ep.support_x), split.features(ep.query_x)  # with gradient, once
    xa = split.adapt_outer()
    xa_d, fs_d, fq_d, sy, qy = detached(xa), detach(fs), detach(fq), ep.support_y, ep.query_y
    y0, w0, problem0, newton = start(algo, p, xa_d, fs_d, sy)
    c_d = centre(algo, p, False)
    y = algo.solve_inner(xa_d, y0, fs_d, sy, cfg.inner_steps, cfg.inner_lr, c_d)
    lr, k = algo.last_inner_lr, cfg.inner_steps
    rhs = fn.outer_gradient(algo.outer_objective, xa_d, y, (fq_d, qy), has_aux=True)
    damping = damping_shift(lr, k, algo.l2_value()) if cfg.implicit == "damped" else None
    v, a0_flat, info = k_step_adjoints(algo.inner_objective, xa_d, y, rhs, (fs_d, sy, c_d, None), lr=lr, steps=k,
                                       implicit=cfg.implicit, damping=damping, cg_steps=cfg.cg_steps,
                                       cg_tol=cfg.cg_tol, cg_hint=algo.cg_hint)
    a0 = unflatten(a0_flat, y)
    with torch.no_grad():  # U = (d2g0/dW2)^{-1} a0_W at W0 (the head's closed-form solve)
        u = problem0.solve(w0, p.layout.matrix({n: a0[n] for n in p.head_names}).unsqueeze(0))

    lam, init = algo.l2_attached(), split.inner_init()
    mixed = fn.mixed_term(algo.inner_objective, xa, y, v, (fs, sy, centre(algo, p, True), lam))
    f, pred = algo.outer_objective(xa, detached(y), (fq, qy))
    body = p.body_names(init)
    start_term = torch.stack([(a0[n] * init[n]).sum() for n in body]).sum()
    head_term = head_problem(algo, p, head_inputs(p, {**xa, **init}, fs), sy, lam).grad_dot(w0, u)[0]
    (scale * (f - mixed + start_term - head_term)).backward()

    last = algo.last_inner
    stats: dict[str, Any] = {"loss": f.detach(), "cg_iterations": info.rows["iterations"].max(),
                             "cg_residual": info.rows["residual"].max(), "inner_lr": lr,
                             "inner_iterations": last.iterations, "inner_grad_norm": last.grad_norm,
                             "head_iterations": newton.iterations, "head_capped": newton.capped}
    if algo.log_l2 is not None:
        stats["l2"] = algo.l2_value()
    accs = algo.loss.accuracies(pred, qy)
    if accs is not None:
        stats["accuracy"] = accs
    stats = host_floats(stats)  # one host read
    algo.cg_hint = algo.cg_hints.push(int(stats["cg_iterations"])) if cfg.implicit != "neumann" else None
    loss, acc = stats.pop("loss"), stats.pop("accuracy", None)
    return StepStats(loss, acc, stats)
