"""Closed forms for a linear inner head: the inner loss, its gradient, Hessian products and solves.

When the inner part is one `nn.Linear` layer on trunk features F (n x d) -- the head of mrml and
ITD-BiO -- the inner loss g(W) = loss(F~ W^T) + (lam/2)||W - W0||^2 over the augmented weight
W = [weight | bias] (C x (d+1), F~ = [F | 1]) has an explicit gradient and Hessian:

    cross-entropy:  grad = (P - Y)' F~ / n + lam (W - W0),   H = sum_i A_i (x) f~_i f~_i' + lam I,
                    A_i = (diag p_i - p_i p_i') / n  (p_i the softmax of row i);
    squared error:  grad = 2 (Z - T)' F~ / (n O) + lam (W - W0),   A_i = 2 I_O / (n O).

Products H V cost two small matmuls. Solves H^{-1} B use the primal p x p system (p = C(d+1)) or,
when the support set is smaller than the head (n C < p, the usual few-shot case), the dual n C x n C
system of the push-through identity

    (lam I + J' M J)^{-1} = (I - J' M (lam I + J J' M)^{-1} J) / lam,

with J V = F~ V' (the logits map) and M = blockdiag(A_i), so J J' M acts as K A with the kernel
K = F~ F~'. Both give the same solution (tested in float64); neither forms anything of size n x p x p.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.split import ModelSplit, Params


def closed_form_head(split: ModelSplit, kind: str) -> bool:
    """Whether the inner part is exactly one linear layer on trunk features (the closed forms apply)."""
    parts = list(split.adapt.children())
    if len(parts) != 1 or len(list(parts[0].children())) != 1:
        return False
    (layer,) = parts[0].children()
    return (isinstance(layer, nn.Linear) and not split.outer_names and kind in ("classification", "regression")
            and len(split.inner_names) == len(list(layer.parameters())))


@dataclass
class LinearHeadLoss:
    """g(W) = loss(F~ W') + (lam/2)||W - W0||^2 for one task; W is C x (d+1) (bias column last, if any)."""

    feats: torch.Tensor  # F~: (n, d+1) with a column of ones, or (n, d) without bias
    targets: torch.Tensor  # class indices (n,) or regression targets (n, O)
    kind: str
    lam: torch.Tensor | float  # a tensor when learned (the surrogate differentiates through it)
    centre: torch.Tensor | None = None  # W0 (None: 0)
    _kernel: torch.Tensor | None = field(default=None, init=False, repr=False)  # F~ F~', built on first dual solve

    @classmethod
    def build(cls, feats: torch.Tensor, targets: torch.Tensor, kind: str, lam: torch.Tensor | float, bias: bool,
              centre: torch.Tensor | None = None) -> "LinearHeadLoss":
        f = feats.reshape(feats.shape[0], -1)
        if bias:
            f = torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)
        if kind == "regression":
            targets = targets.reshape(f.shape[0], -1)
        return cls(f, targets, kind, lam if isinstance(lam, torch.Tensor) else float(lam), centre)

    # -- loss and gradient --------------------------------------------------------------------------
    def data_value_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unregularised loss and its gradient in W (the outer loss f has this form too)."""
        z, n = self.feats @ w.T, self.feats.shape[0]
        if self.kind == "classification":
            value = F.cross_entropy(z, self.targets)
            resid = torch.softmax(z, dim=1)
            resid[torch.arange(n, device=z.device), self.targets] -= 1.0
            resid = resid / n
        else:
            diff = z - self.targets
            value = diff.pow(2).mean()
            resid = 2.0 * diff / diff.numel()
        return value, resid.T @ self.feats

    def grad_dot(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """<d_W g(W), V> as a differentiable function of the features, lambda and the centre (W, V constant):
        the mixed term of the implicit surrogate, without a double backward."""
        z, n = self.feats @ w.T, self.feats.shape[0]
        u = self.feats @ v.T  # J V: the logits' change along V
        if self.kind == "classification":
            p = torch.softmax(z, dim=1)
            data = ((p * u).sum() - u.gather(1, self.targets.unsqueeze(1)).sum()) / n
        else:
            data = 2.0 * ((z - self.targets) * u).sum() / z.numel()
        dw = w if self.centre is None else w - self.centre
        return data + self.lam * (dw * v).sum()

    def value_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, grad = self.data_value_grad(w)
        if self.lam > 0:
            dw = w if self.centre is None else w - self.centre
            value = value + 0.5 * self.lam * dw.pow(2).sum()
            grad = grad + self.lam * dw
        return value, grad

    # -- curvature ----------------------------------------------------------------------------------
    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """A_i (n, C, C): the per-example curvature of the loss in the logits, scaled by the mean."""
        n, c = self.feats.shape[0], w.shape[0]
        if self.kind == "classification":
            p = torch.softmax(self.feats @ w.T, dim=1)
            return (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / n
        eye = torch.eye(c, dtype=w.dtype, device=w.device)
        return (2.0 / (n * c) * eye).expand(n, c, c)

    def hvp(self, w: torch.Tensor, v: torch.Tensor, a: torch.Tensor | None = None, shift: float = 0.0) -> torch.Tensor:
        """(H + shift I) V at W (V: C x (d+1), or stacked k x C x (d+1)); `a` = weights(w) if known."""
        a = self.weights(w) if a is None else a
        u = v @ self.feats.T  # (..., C, n): J V
        mu = torch.einsum("icd,...di->...ci", a, u)  # M J V
        return mu @ self.feats + (self.lam + shift) * v

    def solve(self, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor | None = None, shift: float = 0.0) -> torch.Tensor:
        """(H + shift I)^{-1} B at W by a dense solve, primal or dual (whichever system is smaller)."""
        a = self.weights(w) if a is None else a
        lam = self.lam + shift
        n, p1 = self.feats.shape
        c = w.shape[0]
        if n * c < c * p1:  # dual: (lam I + K A) z = J B over (n, C)
            if b.dim() != 2:
                raise ValueError("solve takes one right-hand side C x (d+1)")
            if self._kernel is None:
                self._kernel = self.feats @ self.feats.T
            k = self._kernel
            s = torch.einsum("ij,jcd->icjd", k, a).reshape(n * c, n * c)
            s = s + lam * torch.eye(n * c, dtype=s.dtype, device=s.device)
            jb = (b @ self.feats.T).T.reshape(n * c, 1)
            z = torch.linalg.solve(s, jb).reshape(n, c)
            mz = torch.einsum("icd,id->ic", a, z)
            return (b - mz.T @ self.feats) / lam
        h = torch.einsum("icd,ia,ib->cadb", a, self.feats, self.feats).reshape(c * p1, c * p1)
        h = h + lam * torch.eye(c * p1, dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.cholesky_solve(b.reshape(-1, 1), chol).reshape(c, p1)
        return torch.linalg.solve(h, b.reshape(-1)).reshape(c, p1)


class HeadLayout:
    """Converts between the inner parameters of a linear head ({weight, bias} dict, `flat` order) and W."""

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
        return torch.cat([t.reshape(-1) for t in self.params(w).values()])

    def from_flat(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        c, p1 = like.shape
        for k in self.order:
            shape = (c, p1 - (self.bias is not None)) if k == self.weight else (c,)
            size = shape[0] * (shape[1] if len(shape) == 2 else 1)
            parts[k] = v[i : i + size].reshape(shape)
            i += size
        return self.matrix(parts)
