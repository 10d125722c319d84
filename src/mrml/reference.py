"""An independent, exact hypergradient for checking the estimators (float64, dense Hessians).

For a model whose inner part is its final linear layer (`FewShotNet`: `.backbone` then `.head`; or an
`nn.Sequential` ending in an `nn.Linear`) and one episode:

- features   phi_x(.) = the model up to the final linear layer (trunk parameters x; batch norm on the
  statistics of the set it sees, support and query separately);
- inner      g(x, y) = loss(phi_x(S) W^T + b, labels_S) + lam/2 (||W||^2 + ||b||^2), y = (W, b), centre 0;
- outer      f(x, y) = loss(phi_x(Q) W^T + b, labels_Q);
- y*(x)      damped Newton with the dense Hessian (`torch.func.hessian`) until ||d_y g|| <= tol;
- v          torch.linalg.solve(d2g/dy2, d_y f) at y*;
- gradient   d_x f(x, y*) - d_x <d_y g(x, y*), v>   (implicit function theorem).

The hypergradient of Phi(x) = mean over episodes of f(x, y*(x)) is the mean of these. Nothing here
calls mrml's algorithms, inner loops, linear solvers or model split: only torch and torch.func on a
float64 copy of the user's model, so it can judge them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Tensor = torch.Tensor
DT = torch.float64


@dataclass
class ExactHypergradient:
    """d Phi / d x over the trunk parameters (model names), with each episode's y* and certificates."""

    grads: dict[str, Tensor]  # trunk parameter name -> mean hypergradient (float64)
    y_star: list[dict[str, Tensor]]  # per episode: head parameter name -> y*
    phi: float  # Phi(x) = mean f(x, y*)
    newton_steps: list[int] = field(default_factory=list)
    inner_grad_norm: list[float] = field(default_factory=list)  # ||d_y g(x, y*)||: the certificate of y*
    solve_residual: list[float] = field(default_factory=list)  # ||H v - d_y f|| / ||d_y f||

    def flat(self, names: Sequence[str] | None = None) -> Tensor:
        """The gradient as one vector over `names` (default: every trunk parameter, in model order)."""
        return torch.cat([self.grads[n].reshape(-1) for n in (names or list(self.grads))])


class _Parts:
    """A float64 copy of the model cut into trunk (features) and final linear layer (the inner part)."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).to(DT)
        m = self.model
        if isinstance(getattr(m, "head", None), nn.Linear) and isinstance(getattr(m, "backbone", None), nn.Module):
            self.stages = [("backbone", m.backbone)]
            self.head_prefix = "head"
        elif isinstance(m, nn.Sequential) and len(m) >= 2 and isinstance(m[-1], nn.Linear):
            named = list(m.named_children())
            self.stages, self.head_prefix = named[:-1], named[-1][0]
        else:
            raise ValueError("reference: the model must be a FewShotNet (.backbone, linear .head) or an "
                             "nn.Sequential ending in nn.Linear")
        names = [n for n, _ in m.named_parameters()]
        self.head_names = [n for n in names if n.startswith(self.head_prefix + ".")]
        self.trunk_names = [n for n in names if n not in self.head_names]
        ps = dict(m.named_parameters())
        self.head_shapes = [ps[n].shape for n in self.head_names]
        self.has_bias = len(self.head_names) == 2
        self.params = {n: p.detach() for n, p in ps.items()}

    def features(self, trunk: dict[str, Tensor], x: Tensor) -> Tensor:
        for prefix, module in self.stages:
            local = {n[len(prefix) + 1:]: v for n, v in trunk.items() if n.startswith(prefix + ".")}
            x = functional_call(module, local, (x,))
        return x

    def predict(self, y: Tensor, feats: Tensor) -> Tensor:
        c, d = self.head_shapes[0]
        w = y[: c * d].view(c, d)
        out = feats @ w.T
        return out + y[c * d:] if self.has_bias else out

    def y_dict(self, y: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(self.head_names, self.head_shapes):
            k = s.numel()
            out[n] = y[i: i + k].view(s)
            i += k
        return out


def task_loss(kind: str, pred: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy ("classification") or mean squared error ("regression")."""
    if kind == "classification":
        return F.cross_entropy(pred, target)
    if kind == "regression":
        return F.mse_loss(pred.reshape(target.shape), target)
    raise ValueError(f"loss must be classification or regression, not {kind!r}")


def newton(fun: Callable[[Tensor], Tensor], y: Tensor, tol: float, max_steps: int = 100) -> tuple[Tensor, int, float]:
    """Minimise a smooth strongly convex `fun` by damped Newton (dense Hessian, Armijo backtracking that
    admits rounding-level changes of the value) until ||grad|| <= tol. Returns (y, steps, ||grad||)."""
    grad_fn, hess_fn = torch.func.grad(fun), torch.func.hessian(fun)
    best = float("inf")
    for step in range(max_steps + 1):
        grad = grad_fn(y)
        gnorm = float(grad.norm())
        if gnorm <= tol or step == max_steps:
            return y, step, gnorm
        stalled = gnorm >= 0.5 * best and best < 1e3 * tol  # at the rounding floor just above tol
        if stalled:
            return y, step, gnorm
        best = min(best, gnorm)
        d = torch.linalg.solve(hess_fn(y), grad)
        value, slope, t = float(fun(y)), float(grad @ d), 1.0
        slack = 64 * torch.finfo(y.dtype).eps * abs(value)
        while float(fun(y - t * d)) > value - 1e-4 * t * slope + slack and t > 1e-12:
            t *= 0.5
        y = y - t * d
    return y, max_steps, gnorm


def _inputs(ep: Any, kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lab = (lambda t: t.to(DT)) if kind == "regression" else (lambda t: t)
    return ep.support_x.to(DT), lab(ep.support_y), ep.query_x.to(DT), lab(ep.query_y)


def _inner_solution(parts: _Parts, fs: Tensor, ys: Tensor, kind: str, lam: float, tol: float,
                    max_steps: int) -> tuple[Tensor, Callable[[Tensor], Tensor], int, float]:
    def g(y: Tensor) -> Tensor:
        return task_loss(kind, parts.predict(y, fs), ys) + 0.5 * lam * (y * y).sum()

    y0 = torch.zeros(sum(s.numel() for s in parts.head_shapes), dtype=DT)
    scale = max(1.0, float(torch.func.grad(g)(y0).norm()))
    y, steps, gnorm = newton(g, y0, tol * scale, max_steps)
    if not gnorm <= 1e-8 * scale:
        raise RuntimeError(f"reference: Newton did not solve the inner problem (||d_y g|| = {gnorm:.1e} after {steps} steps)")
    return y, g, steps, gnorm


def objective(model: nn.Module, episodes: Sequence[Any], loss: str = "classification", lam: float = 0.01,
              tol: float = 1e-12, max_steps: int = 100) -> float:
    """Phi(x) = mean over `episodes` of f(x, y*(x)) at the model's current parameters (float64)."""
    if lam <= 0:
        raise ValueError("reference: lam must be > 0 (strongly convex inner problem)")
    parts = _Parts(model)
    trunk = {n: parts.params[n] for n in parts.trunk_names}
    total = 0.0
    with torch.no_grad():
        for ep in episodes:
            sx, sy, qx, qy = _inputs(ep, loss)
            fs, fq = parts.features(trunk, sx), parts.features(trunk, qx)
            y, _, _, _ = _inner_solution(parts, fs, sy, loss, lam, tol, max_steps)
            total += float(task_loss(loss, parts.predict(y, fq), qy))
    return total / len(episodes)


def exact_hypergradient(model: nn.Module, episodes: Sequence[Any], loss: str = "classification", lam: float = 0.01,
                        tol: float = 1e-12, max_steps: int = 100) -> ExactHypergradient:
    """The exact hypergradient of Phi(x) = mean_episodes f(x, y*(x)) over the trunk parameters (float64).

    `loss`: "classification" (cross-entropy) or "regression" (mean squared error); `lam` > 0: the ridge
    strength of the inner loss on the final linear layer (weight and bias, centre 0); `tol`: Newton stops at
    ||d_y g|| <= tol * max(1, ||d_y g(0)||). The model is not modified (a float64 copy is used)."""
    if lam <= 0:
        raise ValueError("reference: lam must be > 0 (strongly convex inner problem)")
    parts = _Parts(model)
    names = parts.trunk_names
    total = {n: torch.zeros_like(parts.params[n]) for n in names}
    out = ExactHypergradient(total, [], 0.0)
    phi = 0.0
    for ep in episodes:
        sx, sy, qx, qy = _inputs(ep, loss)
        trunk = {n: parts.params[n].clone().requires_grad_(True) for n in names}
        with torch.enable_grad():
            fs, fq = parts.features(trunk, sx), parts.features(trunk, qx)
            fs_d, fq_d = fs.detach(), fq.detach()
            y, g, steps, gnorm = _inner_solution(parts, fs_d, sy, loss, lam, tol, max_steps)
            rhs = torch.func.grad(lambda yy: task_loss(loss, parts.predict(yy, fq_d), qy))(y)
            h = torch.func.hessian(g)(y)
            v = torch.linalg.solve(h, rhs)
            residual = float((h @ v - rhs).norm() / rhs.norm().clamp_min(torch.finfo(DT).tiny))
            # surrogate f(x, y*) - <d_y g(x, y*), v> with y*, v constants: its x-gradient is the hypergradient
            yr = y.detach().requires_grad_(True)
            inner = task_loss(loss, parts.predict(yr, fs), sy) + 0.5 * lam * (yr * yr).sum()
            (gy,) = torch.autograd.grad(inner, yr, create_graph=True)
            f = task_loss(loss, parts.predict(y.detach(), fq), qy)
            grads = torch.autograd.grad(f - (gy * v).sum(), list(trunk.values()), allow_unused=True)
        for n, gr in zip(names, grads):
            if gr is not None:
                total[n] += gr.detach() / len(episodes)
        phi += float(f.detach()) / len(episodes)
        out.y_star.append({n: t.detach().clone() for n, t in parts.y_dict(y.detach()).items()})
        out.newton_steps.append(steps)
        out.inner_grad_norm.append(gnorm)
        out.solve_residual.append(residual)
    out.phi = phi
    return out
