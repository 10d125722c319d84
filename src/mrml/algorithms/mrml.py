"""Memory-reduced meta-learning: the implicit hypergradient of Yang, Ma & Yu (AAAI 2025), Algorithm 1.

Per task: the trunk runs once on support and query with gradient; the inner part y is fitted on a
detached copy of the support features (no graph across iterations); a linear system gives
v ~ (d2g/dy2)^{-1} d_y f(x, y); then one backward pass of the surrogate f(x, y) - <d_y g(x, y), v>
(y and v constant) gives the hypergradient d_x f - (d2g/dx dy) v. Nothing kept depends on the number
of inner or solver iterations, so memory is constant in both.

The inner solver (`config.inner_solver`):
- `newton` (the default when the inner part is a linear head): solves the inner problem to `inner_tol`
  (closed-form Newton for a linear head, Newton-CG with a line search otherwise). The implicit
  formula assumes d_y g(x, y) = 0: here it holds, so the estimate is the hypergradient of
  Phi(x) = f(x, y*(x)), the paper's object, to solver accuracy. For wider inner parts (last block,
  whole network) the proximal inner problem is not convex and Newton-CG did not reach its tolerance
  in 20 iterations on glyphs (README), so `gd` stays their default.
- `gd`: Algorithm 1 as written: K gradient steps of size alpha (with the divergence guard). When K
  steps do not solve the inner problem (small lambda), the implicit formula is applied at a y_K it
  does not describe: at lambda = 0.01, K = 20 the estimate is several times too long (see
  benchmarks/estimator.py).

The linear system (`config.implicit`):
- `direct`: (d2g/dy2) v = d_y f solved densely with the closed-form Hessian of a linear head (the
  default where that exists): v exact;
- `cg`: the same system by N conjugate-gradient steps on Hessian-vector products (the default
  elsewhere; the paper's routine);
- `damped`: CG on (d2g/dy2 + delta I) v = d_y f, delta = max(0, 1/(alpha K) - lambda): the ridge proxy
  of stopping gradient descent after K steps. It estimates the hypergradient of the K-step problem
  (the object ITD-BiO differentiates), not of f(x, y*(x));
- `neumann`: v = alpha sum_{j<K} (I - alpha H)^j d_y f (K Hessian-vector products): exactly the
  hypergradient of K gradient steps from y_K's neighbourhood, the K-step object as well.

`config.learn_l2` makes lambda an outer variable (lambda = exp(s)): d Phi / d lambda = -<v, y - y0>,
which the surrogate's backward already yields (its inner-gradient term holds lambda).

`config.project_head` (inner part wider than the head): the head solved exactly first, then K gradient steps
on the whole part, the K-step hypergradient by neumann or damped in flat memory (`mrml.algorithms.projected`).

With a proximal inner loss (inner part wider than the head), the centre y0 is an outer variable and
the same surrogate yields its gradient lam * v: this is iMAML's (I + H/lam)^{-1} d_y f.

The steps are those of the functional core (`mrml.functional`: `solve_inner`, `outer_gradient`,
`hessian_vector_product` + `implicit_solve`, `mixed_term`, composed as `hypergradient` composes them)
with g = `inner_objective` and f = `outer_objective` built from the model; the closed forms of a
linear head (the exact Newton solve, `direct`) take the place of the autograd ones where they apply.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import functional as fn
from ..data.base import Episode
from ..errors import NonFiniteError, UsageError
from ..implicit import CGInfo, IterationHint
from ..models.split import Params
from ..pytree import detach
from .base import IMPLICIT_SYSTEMS, MetaAlgorithm, StepStats, detached, host_floats
from .batched import batched_meta_gradient
from .exact_head import (centre_matrix, damping_shift, head_problem, head_step, implicit_solution,
                         step_records)
from .guards import all_finite
from . import projected


class MRML(MetaAlgorithm):
    """Algorithm 1 of Yang, Ma & Yu: the implicit hypergradient d_x f - (d2g/dx dy) v with
    (d2g/dy2) v = d_y f, from one backward of the surrogate f - <d_y g, v>; the inner solve keeps no
    graph, so memory does not grow with the inner or solver iterations. Default form (linear head):
    exact inner solve (`newton`), `direct` linear system, lambda learned from 0.1; wider inner parts
    run K gradient steps + CG (see the module docstring for every option).

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import MRML, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = MRML(model, "classification", AlgoConfig(inner="2"))  # inner part: the head model[2]
        >>> cfg = learner.config
        >>> cfg.inner_solver, cfg.implicit, cfg.learn_l2, cfg.l2
        ('newton', 'direct', True, 0.1)
        >>> opt = torch.optim.Adam(learner.outer_parameters(), lr=1e-2)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), sorted(stats.extra)[:3], round(learner.l2, 2)
        (1.26, ['cg_iterations', 'cg_residual', 'inner_capped'], 0.1)
    """

    name = "mrml"
    has_batched_path = True
    inner_solvers = ("newton", "gd")
    can_learn_l2 = True
    has_projected_form = True
    #: the default form, chosen on validation accuracy (README): exact solve, lambda learned from 0.1
    default_learn_l2 = True
    default_l2 = 0.1

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.implicit is None:
            cfg.implicit = "neumann" if cfg.project_head else "direct" if self.head is not None else "cg"
        #: the wider form's split of the adapted part at its head (`config.project_head`; else None)
        self.projection: projected.Projection | None = projected.make_projection(self) if cfg.project_head else None
        if cfg.implicit not in IMPLICIT_SYSTEMS:
            raise UsageError(f"--implicit must be one of {', '.join(IMPLICIT_SYSTEMS)} (got {cfg.implicit!r})")
        if cfg.implicit == "direct" and self.head is None:
            raise UsageError("--implicit direct needs the inner part to be one linear layer (the head) under "
                             "classification or regression loss: use --implicit cg")
        if cfg.batched and not self.exact_head and (cfg.inner_solver != "gd" or cfg.implicit == "direct"):
            raise UsageError("--task-chunk, --amp and --compile run the exact head solve (a linear inner head) or "
                             "Algorithm 1's gradient-descent form (any --implicit but direct) on stacked tasks; "
                             "Newton-CG on a wider inner part runs per task: use --inner-solver gd, or drop those options")
        self._warm: dict[Any, tuple[Params, torch.Tensor]] = {}
        #: Newton iterations the last exact head solve needed, CG iterations the last linear solve needed
        #: (their host checks start there; None: every iteration)
        self.newton_hint: int | None = None
        self.cg_hint: int | None = None
        self.cg_hints = IterationHint()  # CG's hint from the iterations of the last solves

    def meta_gradient(self, episodes: list[Episode], task_ids: list[Any] | None = None,
                      scale: float | None = None, *, accumulate: bool = False,
                      check_finite: bool = True) -> StepStats:
        """Set (or, `accumulate=True`, add to) `.grad` of the outer parameters: the mean implicit
        hypergradient over `episodes`, and a learned lambda's gradient. Task-batched
        (`mrml.algorithms.batched`) when `task_chunk` > 1, amp or compile.

        Args:
            episodes, task_ids, scale, accumulate, check_finite: as for `MetaAlgorithm.meta_gradient`
                (the same checks and errors, on both paths; on a NonFiniteError the warm starts holding
                non-finite values are dropped as well).

        Returns:
            `StepStats` averaged over the tasks: query loss and accuracy at the solved inner part, and in
            `extra` the solver figures (cg_iterations, cg_residual, inner_grad_norm, inner_lr, ...;
            l2 when learned).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mrml import MRML, AlgoConfig, Episode
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
            >>> learner = MRML(model, "classification", AlgoConfig(inner="2", inner_solver="gd", implicit="cg"))
            >>> y = torch.arange(3).repeat(2)
            >>> eps = [Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
            ...        for _ in range(2)]
            >>> stats = learner.meta_gradient(eps)
            >>> model[0].weight.grad.shape, stats.extra["cg_residual"] < 1e-6
            (torch.Size([8, 4]), True)
        """
        try:
            if self.config.batched:
                return batched_meta_gradient(self, episodes, task_ids, scale, accumulate=accumulate,
                                             check_finite=check_finite)
            return super().meta_gradient(episodes, task_ids, scale, accumulate=accumulate, check_finite=check_finite)
        except NonFiniteError:  # keep no warm start that holds the non-finite solve
            self._warm = {t: (y, v) for t, (y, v) in self._warm.items() if bool(all_finite([*y.values(), v]))}
            raise

    # -- f as the functional core takes it (g: `MetaAlgorithm.inner_objective`) -------------------
    def outer_objective(self, x: Params, y: Params, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x, y, batch), predictions) with batch = (query features, labels)."""
        feats, labels = batch
        pred = self.split.predict({**x, **y}, feats)
        return self.loss(pred, labels), pred

    # -- Algorithm 1's steps: inner solve, rhs, linear system, mixed term -------------------------
    def solve(self, xa: Params, y: Params, fs: Any, ys: torch.Tensor, rhs: torch.Tensor,
              centre: Params | None, v0: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
        """v for the surrogate by `config.implicit`, at y with x detached (see the module docstring)."""
        cfg = self.config
        if cfg.implicit == "direct":  # the closed-form solve of the default form (exact_head), T = 1
            problem = head_problem(self, fs.unsqueeze(0), ys.unsqueeze(0), self.l2_value(),
                                   centre_matrix(self, centre, 1))
            w = self.head.matrix(y)
            v, its, resid, bad = implicit_solution(self, problem, w.unsqueeze(0),
                                                   self.head.from_flat(rhs, w).unsqueeze(0), None)
            info = CGInfo(its.max(), resid.max(), torch.isfinite(resid).all(), bad.sum(),
                          {"iterations": its, "residual": resid, "bad": bad})
            return self.head.to_flat(v[0]), info
        hvp = fn.hessian_vector_product(self.inner_objective, xa, y, (fs, ys, centre, None))
        lr, k = self.last_inner_lr, cfg.inner_steps
        damping = damping_shift(lr, k, self.l2_value()) if cfg.implicit == "damped" else None
        return fn.implicit_solve(hvp, rhs, implicit=cfg.implicit, cg_steps=cfg.cg_steps, cg_tol=cfg.cg_tol, v0=v0,
                                 cg_hint=self.cg_hint,
                                 damping=damping, lr=lr, steps=k)

    def query_gradient(self, xa: Params, y: Params, fq: Any, qy: torch.Tensor) -> torch.Tensor:
        """d_y f(x, y), flat, x detached (closed form on the `direct` path; autograd, as the paper's
        routine computes it, otherwise)."""
        if self.config.implicit == "direct":
            query = head_problem(self, fq.unsqueeze(0), qy.unsqueeze(0), 0.0, None)
            return self.head.to_flat(query.data_value_grad(self.head.matrix(y).unsqueeze(0))[1][0])
        return fn.outer_gradient(self.outer_objective, xa, y, (fq, qy), has_aux=True)

    def mixed_term(self, xa: Params, y: Params, v: torch.Tensor, fs: Any, ys: torch.Tensor,
                   centre: Params | None) -> torch.Tensor:
        """<d_y g(x, y), v> with y, v constant and x (trunk features, outer part, centre, lambda) attached."""
        lam = self.l2_attached()
        if self.config.implicit == "direct":
            w = self.head.matrix(detached(y))
            problem = head_problem(self, fs.unsqueeze(0), ys.unsqueeze(0), lam, centre_matrix(self, centre, 1))
            return problem.grad_dot(w.unsqueeze(0), self.head.from_flat(v, w).unsqueeze(0))[0]
        return fn.mixed_term(self.inner_objective, xa, y, v, (fs, ys, centre, lam))

    @property
    def exact_head(self) -> bool:
        """Whether the default form's closed forms run: a linear head solved by Newton (`exact_head`)."""
        return self.head is not None and self.config.inner_solver == "newton"

    def warm_heads(self, ids: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads to start from (T, C, d+1) -- a task's last solution under `warm_start`, else the
        inner init -- and the warm starts of V (None when no task has one)."""
        cfg, init = self.config, self.head.matrix(detached(self.split.inner_init()))
        warm = [self._warm.get(t) if (cfg.warm_start and t is not None) else None for t in ids]
        w0 = torch.stack([self.head.matrix(w[0]) if w is not None else init for w in warm])
        if all(w is None for w in warm):
            return w0, None
        return w0, torch.stack([self.head.from_flat(w[1], init) if w is not None else torch.zeros_like(init)
                                for w in warm])

    def exact_head_gradient(self, fs: torch.Tensor, fq: torch.Tensor, sy: torch.Tensor, qy: torch.Tensor,
                            ids: list[Any], scale: float, finite_rows: list[torch.Tensor] | None = None
                            ) -> list[StepStats]:
        """The default form on T stacked tasks (`exact_head.head_step`): the per-task loop calls it with
        T = 1, the task-batched path with a chunk; statistics from one host read. Appends to
        `finite_rows` a (T,) bool tensor: each task's head and system solution finite (no sync)."""
        w0, v0 = self.warm_heads(ids)
        step = head_step(self, fs, fq, sy, qy, w0, scale, v0)
        if finite_rows is not None:
            finite_rows.append(torch.isfinite(step.w).all((1, 2)) & torch.isfinite(step.v).all((1, 2)))
        if self.config.warm_start:
            for c, t in enumerate(ids):
                if t is not None:
                    self._warm[t] = (self.head.params(step.w[c].clone()), self.head.to_flat(step.v[c]).clone())
        return [StepStats(loss, acc, extra) for loss, acc, extra in step_records(self, step)]

    def adapted_inner(self, xa: Params, fs: Any, ys: torch.Tensor) -> Params:
        """The test-time inner solution; the wider form (`project_head`): its head solved, then `test_steps`
        gradient steps at `test_lr` (`projected.adapted_inner`)."""
        if self.projection is None:
            return super().adapted_inner(xa, fs, ys)
        cfg = self.config
        return projected.adapted_inner(self, self.projection, xa, fs, ys, cfg.test_steps, cfg.test_lr)

    def task_gradient(self, ep: Episode, scale: float, task_id: Any = None) -> StepStats:
        if self.projection is not None:
            return projected.task_gradient(self, self.projection, ep, scale)
        cfg, split = self.config, self.split
        fs, fq = split.features(ep.support_x), split.features(ep.query_x)  # with gradient, once
        if self.exact_head:
            return self.exact_head_gradient(fs.unsqueeze(0), fq.unsqueeze(0), ep.support_y.unsqueeze(0),
                                            ep.query_y.unsqueeze(0), [task_id], scale)[0]
        xa = split.adapt_outer()
        xa_d, fs_d, fq_d = detached(xa), detach(fs), detach(fq)
        warm = self._warm.get(task_id) if (cfg.warm_start and task_id is not None) else None
        y0 = warm[0] if warm is not None else split.inner_init()
        y = self.solve_inner(xa_d, y0, fs_d, ep.support_y, cfg.inner_steps, cfg.inner_lr, self.centre(False))

        rhs = self.query_gradient(xa_d, y, fq_d, ep.query_y)
        v, info = self.solve(xa_d, y, fs_d, ep.support_y, rhs, self.centre(False), warm[1] if warm else None)
        if cfg.warm_start and task_id is not None:
            self._warm[task_id] = (y, v)

        # surrogate f(x, y) - <d_y g(x, y), v>: one backward through the trunk
        mixed = self.mixed_term(xa, y, v, fs, ep.support_y, self.centre(True))
        f, pred = self.outer_objective(xa, detached(y), (fq, ep.query_y))
        (scale * (f - mixed)).backward()
        rows, last = info.rows, self.last_inner
        stats = {"loss": f.detach(), "cg_iterations": rows["iterations"].max(), "cg_residual": rows["residual"].max(),
                 "nonpositive_curvature": rows["bad"].any(), "inner_lr": self.last_inner_lr,
                 "inner_iterations": last.iterations, "inner_grad_norm": last.grad_norm,
                 "inner_capped": last.capped, "inner_stalled": last.stalled}
        if self.log_l2 is not None:
            stats["l2"] = self.l2_value()
        accs = self.loss.accuracies(pred, ep.query_y)
        if accs is not None:
            stats["accuracy"] = accs
        stats = host_floats(stats)  # one host read
        self.cg_hint = self.cg_hints.push(int(stats["cg_iterations"]))
        loss, acc = stats.pop("loss"), stats.pop("accuracy", None)
        return StepStats(loss, acc, stats)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "warm": self._warm} if self._warm else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._warm = dict(state.get("warm", {}))
