"""Closed forms and Newton for T stacked linear heads, with per-task reductions and no host reads.

For task t, g_t(W) = loss(F~_t W') + (lam_t/2)||W - W0_t||^2 over W = [weight | bias] (C x (d+1)),
with closed forms for its value, gradient, Hessian products and solves (T = 1: one task). The Hessian is H = sum_i A_i (x) f~_i f~_i' + lam I with A_i the curvature of
the loss in the logits of example i. `HeadProblem.solve` applies H^{-1} by the cheapest of

- dual:     the n C x n C push-through system (lam I + K A) z = J B, LU (`solve_ex`);
- primal:   the dense C(d+1) x C(d+1) system, Cholesky;
- woodbury: softmax cross-entropy only: H = blockdiag_c(B_c) - U U' with
            B_c = F~' diag(p_:c / n) F~ + lam I and U's columns u_i = (p_i (x) f~_i) / sqrt(n), so
            H^{-1} = B^{-1} + B^{-1} U S^{-1} U' B^{-1},  S = I_n - U' B^{-1} U:
            C Cholesky factorisations of (d+1) x (d+1) plus one n x n system. S is positive definite
            whenever H is (S = I - V'V and H = B^{1/2}(I - V V')B^{1/2}, V = B^{-1/2} U). For squared
            error U = 0 and all C blocks are one matrix: one (d+1) x (d+1) factorisation.

picked by the leading flop counts of `solve_costs`. Cholesky factorisations never read their status
on the host: `spd_solve` computes an LU solve for every row and keeps it where a row's factorisation
failed (`fallback="lu"`), or reads the status once (`fallback="host"`, LU only if some row failed).

`newton_heads` is the Newton rule of `mrml.solvers.newton` run on all T tasks at once: masked, with every
Armijo trial t = 1, 1/2, ..., 2^-(m-1) evaluated in one pass (the logits are affine along the search
line and the ridge term quadratic in t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from ..errors import UsageError
from ..pytree import flatten, unflatten
from .newton import ARMIJO, MAX_BACKTRACK, InnerSolveInfo

Params = dict[str, torch.Tensor]

KINDS = ("classification", "regression")
FORMS = ("dual", "primal", "woodbury")


class HeadLayout:
    """Converts between the inner parameters of a linear head ({weight, bias} dict, in their order) and
    W = [weight | bias]; `to_flat`/`from_flat` are `mrml.pytree.flatten`/`unflatten` of the parameters."""

    def __init__(self, inner: Params):
        names = list(inner)
        self.weight = next(n for n in names if inner[n].dim() == 2)
        self.bias = next((n for n in names if inner[n].dim() == 1), None)
        self.order = names

    def matrix(self, y: Params) -> torch.Tensor:
        """W = [weight | bias] (C x (d+1)); stacked heads (T, C, d+1) from stacked parameters."""
        w = y[self.weight]
        return torch.cat([w, y[self.bias].unsqueeze(-1)], dim=-1) if self.bias is not None else w

    def params(self, w: torch.Tensor) -> Params:
        """The inner parameters of W (C x (d+1), or stacked (T, C, d+1))."""
        out = {self.weight: w[..., : w.shape[-1] - (self.bias is not None)]}
        if self.bias is not None:
            out[self.bias] = w[..., -1]
        return {k: out[k] for k in self.order}

    def to_flat(self, w: torch.Tensor) -> torch.Tensor:
        """The flat vector of W's parameters (one head C x (d+1))."""
        return flatten(self.params(w))

    def from_flat(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """W (shaped as `like`, C x (d+1)) from the flat vector of its parameters."""
        return self.matrix(unflatten(v, self.params(like)))


def spd_solve(m: torch.Tensor, rhs: torch.Tensor, fallback: str = "lu") -> torch.Tensor:
    """m^{-1} rhs for a batch of symmetric matrices (..., k, k) by Cholesky; rows whose factorisation
    fails get an LU solve: computed for all rows and selected (`"lu"`, no host read) or computed only
    when some row failed (`"host"`, one host read). `"ldl"`: one symmetric-indefinite LDL' factorisation
    (Bunch-Kaufman) for every row instead, no host read and no second factorisation: the cheapest on
    CPU, where `newton_heads` uses it (`default_fallback`)."""
    if fallback == "ldl":
        ld, pivots, _ = torch.linalg.ldl_factor_ex(m)
        return torch.linalg.ldl_solve(ld, pivots, rhs)
    chol, info = torch.linalg.cholesky_ex(m)
    x = torch.cholesky_solve(rhs, chol)
    bad = (info != 0)[..., None, None]
    if fallback == "lu" or bool(bad.any()):
        x = torch.where(bad, torch.linalg.solve_ex(m, rhs)[0], x)
    return x


def default_fallback(device: torch.device) -> str:
    """`spd_solve`'s fallback for `device`: "ldl" on CPU (one factorisation per row, measured cheaper
    than Cholesky with an LU beside it), "lu" elsewhere (Cholesky's batched kernels; no host read)."""
    return "ldl" if device.type == "cpu" else "lu"


def solve_costs(kind: str, n: int, c: int, p1: int, fallback: str = "lu") -> dict[str, float]:
    """Leading flop counts per task of the three forms of `HeadProblem.solve` (T scales all alike):
    n examples, C classes (outputs), p1 = d+1 columns. With `fallback="lu"` every Cholesky
    factorisation (k^3/3) is paired with an LU one (2k^3/3) and each triangular solve with an LU solve."""
    f, s = (3.0, 2.0) if fallback == "lu" else (1.0, 1.0)
    nc, cp = n * c, c * p1
    costs = {"dual": 2 * nc**3 / 3 + 2 * nc * nc + 2 * n * n * p1,
             "primal": f * cp**3 / 3 + 2 * n * c * c * p1 * p1 + s * 2 * cp * cp}
    if kind == "classification":  # blocks, B^{-1}[U | b] (solved, or B^{-1} times it), U'B^{-1}U, the n x n system
        rhs = s * 2 * c * p1**2 * (n + 1) if n + 1 <= p1 else s * 2 * c * p1**3 + 2 * c * p1**2 * (n + 1)
        costs["woodbury"] = f * c * p1**3 / 3 + 2 * n * c * p1**2 + rhs + 2 * n * n * cp + f * n**3 / 3
    else:
        costs["woodbury"] = f * p1**3 / 3 + 2 * n * p1**2 + s * 2 * c * p1**2
    return costs


def _axpy(y: torch.Tensor, lam: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """y + lam x in one operation (lam a float, or a tensor broadcastable against x)."""
    return torch.addcmul(y, lam, x) if isinstance(lam, torch.Tensor) else torch.add(y, x, alpha=lam)


class HeadPoint(NamedTuple):
    """g at one W per task, with what Newton reuses: value (T,), gradient (T, C, d+1), logits (T, n, C),
    probabilities (T, n, C; None for regression), ||W - W0||^2 (T,; None without a ridge term)."""

    value: torch.Tensor
    grad: torch.Tensor
    z: torch.Tensor
    p: torch.Tensor | None
    sq: torch.Tensor | None


@dataclass
class HeadProblem:
    """T stacked linear-head inner losses; every method reduces per task (leading dim T)."""

    feats: torch.Tensor  # F~: (T, n, d+1) with a column of ones, or (T, n, d) without bias
    targets: torch.Tensor  # class indices (T, n) or regression targets (T, n, O)
    kind: str
    lam: torch.Tensor | float  # float, 0-d tensor or (T,) tensor (a tensor when learned)
    centre: torch.Tensor | None = None  # W0: (T, C, d+1) (None: 0)
    fallback: str = "lu"  # see spd_solve
    _forms: dict[int, str] = field(default_factory=dict, init=False, repr=False)  # `form`'s choice per C
    _cache: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False)  # see `_cached`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"HeadProblem kind must be one of {KINDS}, got {self.kind!r}")
        if self.feats.dim() != 3:
            raise UsageError(f"HeadProblem feats must be (T, n, d+1), got shape {tuple(self.feats.shape)}")
        t, n, p1 = self.feats.shape
        want = (t, n) if self.kind == "classification" else (t, n, self.targets.shape[-1])
        if tuple(self.targets.shape) != want:
            raise UsageError(f"HeadProblem {self.kind} targets must have shape {want}, got {tuple(self.targets.shape)}")
        if self.centre is not None and (self.centre.dim() != 3 or self.centre.shape[0] != t or self.centre.shape[2] != p1):
            raise UsageError(f"HeadProblem centre must be (T={t}, C, {p1}), got {tuple(self.centre.shape)}")
        if isinstance(self.lam, torch.Tensor) and tuple(self.lam.shape) not in ((), (t,)):
            raise UsageError(f"HeadProblem lam must be a float, a 0-d tensor or a ({t},) tensor, got {tuple(self.lam.shape)}")
        if self.fallback not in ("lu", "host", "ldl"):
            raise UsageError(f"HeadProblem fallback must be 'lu', 'host' or 'ldl', got {self.fallback!r}")

    @classmethod
    def build(cls, feats: torch.Tensor, targets: torch.Tensor, kind: str, lam: torch.Tensor | float, bias: bool,
              centre: torch.Tensor | None = None, fallback: str = "lu") -> "HeadProblem":
        """From trunk features (T, n, ...) (flattened per example, a ones column appended if `bias`)."""
        f = feats.reshape(feats.shape[0], feats.shape[1], -1)
        if bias:
            f = torch.cat([f, f.new_ones(f.shape[0], f.shape[1], 1)], dim=2)
        if kind == "regression":
            targets = targets.reshape(f.shape[0], f.shape[1], -1)
        return cls(f, targets, kind, lam if isinstance(lam, torch.Tensor) else float(lam), centre, fallback)

    # -- helpers ------------------------------------------------------------------------------------
    def _lam(self, k: int) -> torch.Tensor | float:
        """lambda broadcastable against a (T, ...) tensor with k trailing dims."""
        if isinstance(self.lam, torch.Tensor) and self.lam.dim() == 1:
            return self.lam.reshape(-1, *([1] * k))
        return self.lam

    def _shift(self, k: int) -> torch.Tensor:
        """lam I_k per task, (T or 1, k, k), made once per size."""
        def make() -> torch.Tensor:
            eye = torch.eye(k, dtype=self.feats.dtype, device=self.feats.device)
            return self._lam(2) * eye if isinstance(self.lam, torch.Tensor) else eye * self.lam

        return self._cached(("shift", k), make)

    def _gram(self) -> torch.Tensor:
        """K = F~ F~' per task (T, n, n), made once."""
        return self._cached(("gram",), lambda: torch.bmm(self.feats, self.feats.transpose(1, 2)))

    def _cached(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A constant of this problem (lam I, F~ F~', target indices, one-hot rows), made once, as a normal
        tensor even when first asked for in inference mode (Newton's), so that later graphs may use it."""
        if key not in self._cache:
            with torch.inference_mode(False):
                self._cache[key] = make()
        return self._cache[key]

    def _trial_terms(self, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the step sizes `ts` (m,): -s (m,) and the powers 1, -2 s, s^2 (3, m), kept for the last `ts` given."""
        hit = self._cache.get(("trials",))
        if hit is None or hit[0] is not ts:
            hit = (ts, ts.neg(), torch.stack([torch.ones_like(ts), -2.0 * ts, ts * ts]))
            self._cache[("trials",)] = hit
        return hit[1], hit[2]

    def _half_lam(self, k: int) -> torch.Tensor | float:
        """lam / 2 as `_lam(k)` gives lam (made once per k; afresh when lam carries a graph)."""
        if not isinstance(self.lam, torch.Tensor):
            return 0.5 * self.lam
        if self.lam.requires_grad:
            return 0.5 * self._lam(k)
        return self._cached(("half_lam", k), lambda: 0.5 * self._lam(k))

    def _onehot(self, c: int) -> torch.Tensor:
        """The targets one-hot (T, n, C) (classification)."""
        return self._cached(("onehot", c), lambda: (self.targets.unsqueeze(2) == torch.arange(
            c, device=self.targets.device)).to(self.feats.dtype))

    def _ridge(self) -> bool:
        return isinstance(self.lam, torch.Tensor) or self.lam != 0

    def _dw(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.centre is None else w - self.centre

    def logits(self, w: torch.Tensor) -> torch.Tensor:
        """F~ W' per task: (T, n, C)."""
        return torch.bmm(self.feats, w.transpose(1, 2))

    # -- loss and gradient --------------------------------------------------------------------------
    def logit_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-task data loss (T,), its gradient in the logits (T, n, C) and the probabilities (T, n, C;
        None for regression), from one log-softmax."""
        t, n, c = z.shape
        if self.kind == "classification":
            lsm = torch.log_softmax(z, dim=2)
            p = lsm.exp()
            value = lsm.gather(2, self._cached(("idx",), lambda: self.targets.unsqueeze(2))).mean((1, 2)).neg()
            return value, (p - self._onehot(c)) / n, p
        diff = z - self.targets
        return diff.pow(2).mean((1, 2)), 2.0 * diff / (n * c), None

    def data_value_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unregularised losses (T,) and their gradients (T, C, d+1) at W (T, C, d+1)."""
        value, resid, _ = self.logit_terms(self.logits(w))
        return value, torch.bmm(resid.transpose(1, 2), self.feats)

    def value_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g_t (T,) and d_W g_t (T, C, d+1) at W."""
        at = self.point(w)
        return at.value, at.grad

    def point(self, w: torch.Tensor) -> HeadPoint:
        """g, its gradient and what Newton reuses at W: the logits, the probabilities (classification),
        ||W - W0||^2 -- one log-softmax for the value and the gradient."""
        z = self.logits(w)
        value, resid, p = self.logit_terms(z)
        grad, sq = torch.bmm(resid.transpose(1, 2), self.feats), None
        if self._ridge():
            dw = self._dw(w)
            sq = dw.pow(2).sum((1, 2))
            value, grad = _axpy(value, self._half_lam(0), sq), _axpy(grad, self._lam(2), dw)
        return HeadPoint(value, grad, z, p, sq)

    def values_along(self, w: torch.Tensor, d: torch.Tensor, ts: torch.Tensor, at: HeadPoint | None = None) -> torch.Tensor:
        """g_t(W - s D) for every task and every s in `ts` (m,): (T, m), from one pass over the logits
        z(s) = z(W) - s F~ D' (laid out (T, n, C, m): the reductions over the classes run along the
        trials) and the ridge term quadratic in s; `at` = point(W) if known."""
        zw = self.logits(w) if at is None else at.z
        m, (neg_ts, powers) = ts.shape[0], self._trial_terms(ts)
        z = torch.addcmul(zw.unsqueeze(3), self.logits(d).unsqueeze(3), neg_ts)  # (T, n, C, m)
        if self.kind == "classification":
            top = z.amax(2, keepdim=True)
            lse = (z - top).exp_().sum(2, keepdim=True).log_().add_(top)
            idx = self._cached(("idx", m), lambda: self.targets[:, :, None, None].expand(-1, -1, 1, m))
            value = (lse - z.gather(2, idx)).mean((1, 2))
        else:
            value = (z - self.targets.unsqueeze(3)).pow(2).mean((1, 2))
        if self._ridge():  # (lam/2)||W - s D - W0||^2 = (lam/2)(a0 - 2 s a1 + s^2 a2), for every s by one product
            t, dw = d.shape[0], self._dw(w)
            a0 = dw.pow(2).sum((1, 2)) if at is None or at.sq is None else at.sq
            a12 = torch.bmm(torch.stack([dw, d], 1).view(t, 2, -1), d.view(t, -1, 1)).view(t, 2)  # <dw, d>, ||d||^2
            value = torch.addmm(value, torch.cat([a0.view(t, 1), a12], 1) * self._half_lam(1), powers)
        return value

    def grad_dot(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """<d_W g_t(W), V> per task (T,), differentiable in the features, lambda and the centre (W, V
        constant): the mixed term of the implicit surrogate, without a double backward."""
        z, u, n = self.logits(w), self.logits(v), self.feats.shape[1]
        if self.kind == "classification":
            p = torch.softmax(z, dim=2)
            data = ((p * u).sum((1, 2)) - u.gather(2, self.targets.unsqueeze(2)).sum((1, 2))) / n
        else:
            data = 2.0 * ((z - self.targets) * u).sum((1, 2)) / (z.shape[1] * z.shape[2])
        return data + self._lam(0) * (self._dw(w) * v).sum((1, 2))

    def feature_grads(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """d/dF~ of the data part of <d_W g_t(W), V> per task (T, n, d+1), W and V constant: R V + Q W with
        R the loss's gradient in the logits and Q = d R along U = F~ V' (`grad_dot` in closed form, for
        the features; its lambda and centre parts are <W - W0, V> and -lam V)."""
        z, u = self.logits(w), self.logits(v)
        _, r, p = self.logit_terms(z)
        if self.kind == "classification":  # J_i u_i / n with J_i = diag(p_i) - p_i p_i'
            pu = p * u
            q = torch.addcmul(pu, p, pu.sum(2, keepdim=True), value=-1.0) / z.shape[1]
        else:
            q = 2.0 * u / (z.shape[1] * z.shape[2])
        return torch.baddbmm(torch.bmm(q, w), r, v)

    # -- curvature ----------------------------------------------------------------------------------
    def probabilities(self, w: torch.Tensor) -> torch.Tensor | None:
        """softmax(F~ W') per task (T, n, C) for classification; None for regression."""
        return torch.softmax(self.logits(w), dim=2) if self.kind == "classification" else None

    def weights(self, w: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """A_i per task (T, n, C, C): the curvature of the loss in the logits, scaled by the mean; `p`
        = the probabilities at W if known (classification)."""
        t, n, c = w.shape[0], self.feats.shape[1], w.shape[1]
        if self.kind == "classification":
            p = self.probabilities(w) if p is None else p
            eye = self._cached(("eye", c), lambda: torch.eye(c, dtype=self.feats.dtype, device=self.feats.device))
            return p.unsqueeze(3) * (eye - p.unsqueeze(2)) / n  # (diag(p_i) - p_i p_i') / n
        return (2.0 / (n * c) * torch.eye(c, dtype=w.dtype, device=w.device)).expand(t, n, c, c)

    def hvp(self, w: torch.Tensor, v: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """H V per task at W (V: T x C x (d+1)); `a` = weights(w) if known."""
        a = self.weights(w) if a is None else a
        t, n, c, _ = a.shape
        mu = torch.bmm(a.reshape(t * n, c, c), self.logits(v).view(t * n, c, 1)).view(t, n, c)  # M J V
        return _axpy(torch.bmm(mu.transpose(1, 2), self.feats), self._lam(2), v)

    def prepare(self, c: int, form: str | None = None) -> None:
        """Make the caches that `solve` by `form` (None: the cheapest) for C classes reads: F~ F~' and lam I."""
        form = self.form(c) if form is None else form
        t, n, p1 = self.feats.shape
        if form == "dual":
            self._gram()
            self._shift(n * c)
        elif form == "primal":
            self._shift(c * p1)

    def form(self, c: int) -> str:
        """The form `solve` picks for C classes: the cheapest by `solve_costs`."""
        if c not in self._forms:
            costs = solve_costs(self.kind, self.feats.shape[1], c, self.feats.shape[2], self.fallback)
            self._forms[c] = min(costs, key=costs.get)
        return self._forms[c]

    def solve(self, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor | None = None, form: str | None = None,
              p: torch.Tensor | None = None) -> torch.Tensor:
        """H^{-1} B per task at W (B: T x C x (d+1)) by `form` (None: the cheapest); `a` = weights(w), `p`
        = the probabilities at W (classification), if known."""
        if b.shape != w.shape:
            raise UsageError(f"HeadProblem.solve takes B shaped like W {tuple(w.shape)}, got {tuple(b.shape)}")
        form = self.form(w.shape[1]) if form is None else form
        if form == "woodbury":
            return self._woodbury(w, b, p)
        if form not in FORMS:
            raise UsageError(f"HeadProblem.solve form must be one of {FORMS} or None, got {form!r}")
        a = self.weights(w, p) if a is None else a
        t, n, p1 = self.feats.shape
        c = w.shape[1]
        if form == "dual":  # (lam I + K A) z = J B over (n, C)
            s = torch.addcmul(self._shift(n * c).view(-1, n, c, n, c), self._gram()[:, :, None, :, None],
                              a.permute(0, 2, 1, 3).unsqueeze(1)).view(t, n * c, n * c)  # lam I + K (x) A
            z = torch.linalg.solve_ex(s, self.logits(b).reshape(t, n * c, 1))[0].view(t * n, c, 1)
            mz = torch.bmm(a.reshape(t * n, c, c), z).view(t, n, c)
            return torch.baddbmm(b, mz.transpose(1, 2), self.feats, alpha=-1.0) / self._lam(2)
        h = torch.einsum("tncd,tna,tnb->tcadb", a, self.feats, self.feats).reshape(t, c * p1, c * p1)
        return spd_solve(h + self._shift(c * p1), b.reshape(t, c * p1, 1), self.fallback).reshape(t, c, p1)

    def _woodbury(self, w: torch.Tensor, b: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        f, (t, n, p1), c = self.feats, self.feats.shape, w.shape[1]
        eye = torch.eye(p1, dtype=f.dtype, device=f.device)
        if self.kind == "regression":  # H = I_C (x) (2/(n C) F~'F~ + lam I)
            blk = 2.0 / (n * c) * (f.transpose(1, 2) @ f) + self._lam(2) * eye
            return spd_solve(blk, b.transpose(1, 2), self.fallback).transpose(1, 2)
        p = self.probabilities(w) if p is None else p  # (T, n, C)
        blocks = torch.einsum("tnc,tna,tnb->tcab", p / n, f, f) + self._lam(3) * eye  # B_c
        u = p.transpose(1, 2).unsqueeze(2) * f.transpose(1, 2).unsqueeze(1) / math.sqrt(n)  # (T, C, p1, n)
        ub = torch.cat([u, b.unsqueeze(3)], dim=3)
        if n + 1 > p1:  # fewer columns in B_c^{-1} itself than in [U | b]: invert, then multiply (level 3)
            sol = torch.matmul(spd_solve(blocks, eye.expand_as(blocks), self.fallback), ub)
        else:
            sol = spd_solve(blocks, ub, self.fallback)
        y, y0 = sol[..., :n], sol[..., n]  # B^{-1} U, B^{-1} B
        ut = u.reshape(t, c * p1, n).transpose(1, 2)  # U' (T, n, C (d+1))
        s = torch.baddbmm(torch.eye(n, dtype=f.dtype, device=f.device), ut, y.reshape(t, c * p1, n), alpha=-1.0)
        q = spd_solve(s, torch.bmm(ut, y0.reshape(t, c * p1, 1)), self.fallback)  # S^{-1} U' B^{-1} B
        return y0 + torch.bmm(y.reshape(t * c, p1, n), q.repeat_interleave(c, 0)).reshape(t, c, p1)


def newton_heads(problem: HeadProblem, w0: torch.Tensor, max_iter: int, tol: float, form: str | None = None,
                 sync_every: int = 1, hint: int | None = None) -> tuple[torch.Tensor, InnerSolveInfo]:
    """Minimise every task's g_t from W0 (T, C, d+1) by one masked Newton loop; per task the rule of
    `mrml.solvers.newton`: stop at ||d g|| <= tol max(1, ||d g(W0)||) or `max_iter` iterations;
    full steps while the decrement is below 64 eps of g and they halve ||d g|| (else stop: floor);
    the gradient as direction when the slope is not positive; stalled when no trial decreases g.
    Finished tasks keep their W. Host reads: one `active.any()` every `sync_every` iterations
    (0: none, always `max_iter` iterations); with `hint` (the iterations expected, e.g. the last
    step's most) at iterations hint, hint + 1, hint + 3, hint + 7, ... instead: one or two reads when
    the hint is right, the iterations in between masked. Runs without graph (in inference mode, the
    results cloned out of it: normal tensors). The record's summaries are
    0-d tensors (most iterations, largest norm, any task capped/stalled/at the floor), per task in `rows`."""
    with torch.no_grad():
        problem.prepare(w0.shape[1], form)  # its caches made here are normal tensors, usable later
    with torch.inference_mode():
        x, rows = _newton_loop(problem, w0.detach(), max_iter, tol, form, sync_every, hint)
    x, rows = x.clone(), {k: v.clone() for k, v in rows.items()}
    return x, InnerSolveInfo("newton", rows["iterations"].max(), rows["grad_norm"].max(), rows["capped"].any(),
                             rows["stalled"].any(), rows=rows, floor=rows["floor"].any())


_TRIALS: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _trials(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Armijo trials t = 1, 1/2, ..., 2^-(MAX_BACKTRACK-1) in `dtype`, and -ARMIJO t in float64 (made
    once per dtype and device, in inference mode: read only by `_newton_loop`)."""
    key = (dtype, torch.device(device))
    if key not in _TRIALS:
        ts = 0.5 ** torch.arange(MAX_BACKTRACK, dtype=torch.float64, device=device)
        _TRIALS[key] = (ts.to(dtype), -ARMIJO * ts)  # g(W - t D) <= g + armijo t slope
    return _TRIALS[key]


def _newton_loop(problem: HeadProblem, x: torch.Tensor, max_iter: int, tol: float, form: str | None,
                 sync_every: int, hint: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`newton_heads`' iterations: the solution and the per-task rows."""
    f64 = torch.float64
    at = problem.point(x)
    gnorm = at.grad.norm(dim=(1, 2)).to(f64)
    target = tol * gnorm.clamp_min(1.0)
    eps2 = 2 * 64.0 * torch.finfo(x.dtype).eps
    ts_x, armijo = _trials(x.dtype, x.device)
    it = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    stalled, floor = torch.zeros_like(it, dtype=torch.bool), torch.zeros_like(it, dtype=torch.bool)
    active = (gnorm > target) & (max_iter > 0)
    checks = None if hint is None else {max(hint, 0) + 2**j - 1 for j in range(max(max_iter, 1).bit_length() + 1)}
    for k in range(max_iter):  # after iteration k, it <= k + 1: no task is active past max_iter
        if (k in checks if checks is not None else sync_every and k % sync_every == 0) and not bool(active.any()):
            break
        grad = at.grad
        d = problem.solve(x, grad, form=form, p=at.p)
        slope = (grad * d).sum((1, 2)).to(f64)
        g64 = at.value.to(f64)  # g >= 0 (up to rounding): max(1, g) needs no abs
        descent = slope > 0
        full = descent & (slope <= eps2 * g64.clamp_min(1.0))
        d = torch.where(descent.view(-1, 1, 1), d, grad)  # not a descent direction: the gradient, slope ||d g||^2
        slope = torch.where(descent, slope, gnorm.square())
        ok = problem.values_along(x, d, ts_x, at).to(f64) <= torch.addcmul(g64.view(-1, 1), slope.view(-1, 1), armijo)
        found = (ok * ts_x).amax(1)  # the largest trial that decreases g enough (t decreasing), 0 if none
        xn = torch.addcmul(x, torch.where(full, 1.0, found).view(-1, 1, 1), d, value=-1.0)
        new = problem.point(xn)
        nn = new.grad.norm(dim=(1, 2)).to(f64)
        good = torch.where(full, nn <= 0.5 * gnorm, found > 0)  # a full step must halve ||d g||; else Armijo
        accept = active & good
        missed = active ^ accept
        hit_floor = missed & full
        floor |= hit_floor
        stalled |= missed ^ hit_floor
        x, at = torch.where(accept.view(-1, 1, 1), xn, x), new  # a task not accepted is done: only its W and
        gnorm = torch.where(accept, nn, gnorm)  # ||d g|| are kept, the rest of `at` is never read for it again
        it = it + accept
        active = accept & (gnorm > target)
    capped = (gnorm > target) & ~(stalled | floor)
    return x, {"iterations": it, "grad_norm": gnorm, "capped": capped, "stalled": stalled, "floor": floor}
