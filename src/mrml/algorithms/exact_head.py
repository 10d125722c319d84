"""mrml's default estimator on T stacked tasks: one code for the per-task loop (T = 1) and the chunks.

Given the trunk features of T tasks with gradient (support fs, query fq: (T, n, ...)), the linear
head's inner problem g_t(W) = loss(F~_t W') + (lam/2)||W - W0||^2 is solved on detached features by
one masked Newton loop over the tasks (`mrml.solvers.head.newton_heads`), the implicit system
H_t v_t = d_W f_t by the head's closed forms (`direct`: the cheapest of the dual, primal and
Woodbury solves; or CG on the closed-form Hessian products), and the surrogate
sum_t scale (f_t(W_t) - <d_W g_t(W_t), V_t>) is backpropagated once, W and V constant: its gradients in
the features, lambda (when learned) and a proximal centre are closed forms (`backpropagate_surrogate`),
so no graph of the head is built. Nothing here reads a tensor on the host: the per-task statistics
come back as one stacked tensor (`HeadStep.table`), read once by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torch import nn

from .. import pytree
from ..implicit import conjugate_gradient, neumann_series
from ..models.split import ModelSplit, Params
from ..solvers.head import default_fallback, HeadProblem, newton_heads
from ..solvers.newton import InnerSolveInfo

if TYPE_CHECKING:  # pragma: no cover
    from .base import MetaAlgorithm
    from .mrml import MRML

#: the per-task statistics of one step, in the order of `HeadStep.table`'s rows
STAT_KEYS = ("loss", "cg_iterations", "cg_residual", "nonpositive_curvature", "inner_iterations", "inner_grad_norm",
             "inner_capped", "inner_stalled", "inner_floor")


def closed_form_head(split: ModelSplit, kind: str) -> bool:
    """Whether the inner part is exactly one linear layer on trunk features (the closed forms apply)."""
    parts = list(split.adapt.children())
    if len(parts) != 1 or len(list(parts[0].children())) != 1:
        return False
    (layer,) = parts[0].children()
    return (isinstance(layer, nn.Linear) and not split.outer_names and kind in ("classification", "regression")
            and len(split.inner_names) == len(list(layer.parameters())))


@dataclass
class HeadStep:
    """What `head_step` leaves besides `.grad`: the solved heads W (T, C, d+1), the system's solutions
    V (same shape), and the statistics as one (rows, T) tensor (no host read yet): STAT_KEYS, then the
    query accuracy (when `accuracy`), then lambda (when learned)."""

    w: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    accuracy: bool


def centre_matrix(algo: "MetaAlgorithm", centre: Params | None, t: int) -> torch.Tensor | None:
    """A proximal centre (inner parameters) as T copies of its head matrix (T, C, d+1); None stays None."""
    if centre is None:
        return None
    w = algo.head.matrix(centre)
    return w.unsqueeze(0).expand(t, *w.shape)


def stacked_centre(algo: "MetaAlgorithm", attached: bool, t: int) -> torch.Tensor | None:
    """`algo`'s proximal centre as a head matrix (T, C, d+1), or None without a proximal term."""
    return centre_matrix(algo, algo.centre(attached), t)


def head_problem(algo: "MetaAlgorithm", feats: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor | float,
                 centre: torch.Tensor | None) -> HeadProblem:
    """The inner (or, lam = 0 and no centre, outer) loss of `algo`'s head on T stacked tasks."""
    return HeadProblem.build(feats, labels, algo.loss.kind, lam, algo.head.bias is not None, centre,
                             default_fallback(feats.device))


def solve_head(algo: "MetaAlgorithm", feats: torch.Tensor, labels: torch.Tensor, y0: Params, centre: Params | None,
               max_iter: int) -> tuple[Params, InnerSolveInfo]:
    """One task's head solved exactly by `newton_heads` on T = 1 (test-time adaptation), from y0, without
    graph; its statistics read on the host in one read."""
    problem = head_problem(algo, pytree.detach(feats).unsqueeze(0), labels.unsqueeze(0), algo.l2_value(),
                           None if centre is None else centre_matrix(algo, centre, 1).detach())
    w0 = algo.head.matrix({k: v.detach() for k, v in y0.items()}).unsqueeze(0)
    w, info = newton_heads(problem, w0, max_iter, algo.config.inner_tol)
    return algo.head.params(w[0]), info.host()


def damping_shift(lr: torch.Tensor | float, steps: int, lam: torch.Tensor | float) -> torch.Tensor | float:
    """The damped system's shift max(0, 1/(lr K) - lambda), without a host read: tensors (a learned lambda,
    a guarded step size) give a tensor."""
    shift = 1.0 / (lr * max(steps, 1)) - lam
    return shift.clamp_min(0.0) if isinstance(shift, torch.Tensor) else max(0.0, shift)


def implicit_solution(algo: "MRML", problem: HeadProblem, w: torch.Tensor, b: torch.Tensor,
                      v0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """V ~ H^{-1} B per task by `config.implicit`; returns (V, iterations, relative residual, bad) per task."""
    cfg, t = algo.config, w.shape[0]
    if cfg.implicit == "direct":
        p = problem.probabilities(w)
        a = problem.weights(w, p)
        v = problem.solve(w, b, a=a, p=p)
        resid = (problem.hvp(w, v, a) - b).norm(dim=(1, 2)) / b.norm(dim=(1, 2)).clamp_min(torch.finfo(b.dtype).tiny)
        zero = torch.zeros(t, dtype=torch.long, device=w.device)
        return v, zero, resid, zero.bool()
    a = problem.weights(w)
    shift: torch.Tensor | float = 0.0
    if cfg.implicit == "damped":  # the ridge proxy of stopping after K steps (see mrml.py)
        shift = damping_shift(algo.last_inner_lr, cfg.inner_steps, algo.l2_value())

    def matvec(v: torch.Tensor) -> torch.Tensor:
        vm = v.reshape(w.shape)
        return (problem.hvp(w, vm, a) + shift * vm).reshape(t, -1)

    if cfg.implicit == "neumann":  # K gradient steps' inverse (the K-step object; see mrml.py)
        v, info = neumann_series(matvec, b.reshape(t, -1), algo.last_inner_lr, cfg.inner_steps)
    else:
        x0 = v0.reshape(t, -1) if v0 is not None else None
        v, info = conjugate_gradient(matvec, b.reshape(t, -1), cfg.cg_steps, cfg.cg_tol, x0=x0,
                                     hint=algo.cg_hint)
    rows = info.rows
    return v.reshape(w.shape), rows["iterations"], rows["residual"], rows["bad"]


def head_step(algo: "MRML", fs: torch.Tensor, fq: torch.Tensor, sy: torch.Tensor, qy: torch.Tensor,
              w0: torch.Tensor, scale: float, v0: torch.Tensor | None = None) -> HeadStep:
    """Accumulate `scale` x the hypergradient of each of T tasks into `.grad` (see the module docstring).

    Args:
        algo: an `MRML` whose inner part is a linear head (`algo.head` set), inner solver `newton`.
        fs, fq: support and query trunk features (T, n, ...), with gradient.
        sy, qy: support and query targets (T, n) or (T, n, O).
        w0: the heads to start Newton from (T, C, d+1), e.g. the inner init or a warm start.
        scale: the weight of each task's hypergradient (1 / meta-batch for the mean).
        v0: a warm start for CG (ignored by `direct`).
    """
    cfg, t = algo.config, fs.shape[0]
    algo.last_inner_lr = cfg.inner_lr  # Newton takes no step size; the damped/neumann systems read it
    inner = head_problem(algo, fs.detach(), sy, algo.l2_value(), stacked_centre(algo, False, t))
    w, info = newton_heads(inner, w0.detach(), cfg.inner_steps, cfg.inner_tol, hint=algo.newton_hint)
    query = head_problem(algo, fq.detach(), qy, 0.0, None)
    with torch.inference_mode():  # no graph: the query loss and gradient, the system (v cloned out: a normal tensor)
        pred = query.logits(w)
        f, rq, _ = query.logit_terms(pred)
        v, cg_its, resid, bad = implicit_solution(algo, inner, w, torch.bmm(rq.transpose(1, 2), query.feats), v0)
    v = v.clone()
    backpropagate_surrogate(algo, inner, fs, fq, w, v, rq, scale)
    r = info.rows
    rows = [f, cg_its, resid, bad, r["iterations"], r["grad_norm"], r["capped"], r["stalled"], r["floor"]]
    accs = algo.loss.accuracies(pred, qy)
    if accs is not None:
        rows.append(accs)
    if algo.log_l2 is not None:
        rows.append(torch.as_tensor(algo.l2_value()).detach().expand(t))
    return HeadStep(w, v, torch.stack(rows), accs is not None)  # one dtype by promotion (no casts)


def backpropagate_surrogate(algo: "MRML", inner: HeadProblem, fs: torch.Tensor, fq: torch.Tensor, w: torch.Tensor,
                            v: torch.Tensor, rq: torch.Tensor, scale: float) -> None:
    """Backpropagate sum_t scale (f_t(W_t) - <d_W g_t(W_t), V_t>) -- W, V constant -- from its gradients in
    closed form: in the query features scale R_q W (R_q: d f / d logits), in the support features
    -scale d<d_W g, V>/dF~ (`HeadProblem.feature_grads`), in lambda (when learned) -scale <W - W0, V>
    and in a proximal centre scale lam V: one backward pass, no graph of the head."""
    lam, centre = algo.l2_attached(), stacked_centre(algo, True, w.shape[0])
    outs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    with torch.no_grad():
        for feats, g in ((fs, inner.feature_grads(w, v) * -scale), (fq, torch.bmm(rq, w) * scale)):
            if feats.requires_grad:  # F~ = [features flattened per example | 1]: the features' columns
                outs.append(feats)
                grads.append(g[..., : math.prod(feats.shape[2:])].reshape(feats.shape).to(feats.dtype))
        if isinstance(lam, torch.Tensor) and lam.requires_grad:
            dw = w if centre is None else w - centre.detach()
            outs.append(lam)
            grads.append((dw * v).sum().mul(-scale).reshape(lam.shape).to(lam.dtype))
        if centre is not None and centre.requires_grad:
            outs.append(centre)
            grads.append((v * (scale * algo.l2_value())).to(centre.dtype))
    if outs:
        torch.autograd.backward(outs, grads)


def step_records(algo: "MRML", step: HeadStep) -> list[tuple[float, float | None, dict[str, Any]]]:
    """(loss, accuracy, extra) per task from one host read of the stacked statistics."""
    rows = step.table.tolist()  # the one host read
    k = len(STAT_KEYS)
    algo.newton_hint = int(max(rows[STAT_KEYS.index("inner_iterations")]))  # where the next solves check first
    if algo.config.implicit in ("cg", "damped"):
        algo.cg_hint = algo.cg_hints.push(int(max(rows[STAT_KEYS.index("cg_iterations")])))
    out = []
    for i in range(step.table.shape[1]):
        extra = {key: float(rows[j][i]) for j, key in enumerate(STAT_KEYS) if key != "loss"}
        extra["inner_lr"] = float(algo.config.inner_lr)
        if algo.log_l2 is not None:
            extra["l2"] = rows[-1][i]
        out.append((rows[0][i], rows[k][i] if step.accuracy else None, extra))
    return out
