"""Nested model inputs: a tensor, or dicts, lists and tuples of them (a text model's
`{"input_ids": ..., "attention_mask": ...}`). Small, public-API-only helpers over such trees.

Example:
    >>> import torch
    >>> from mrml.pytree import tree_map, leading_size, leaf_dict, rebuild, flatten, unflatten
    >>> batch = {"ids": torch.zeros(4, 7, dtype=torch.long), "mask": torch.ones(4, 7)}
    >>> leading_size(batch)
    4
    >>> sorted(tree_map(lambda t: t[:2], batch)["mask"].shape)
    [2, 7]
    >>> tree = ({"a": torch.zeros(2)}, [torch.ones(1), 3.0])
    >>> rebuild(tree, [t + 1 for t in leaf_dict(tree).values()])
    ({'a': tensor([1., 1.])}, [tensor([2.]), 3.0])
    >>> flatten(tree), unflatten(torch.arange(3.0), tree)
    (tensor([0., 0., 1.]), ({'a': tensor([0., 1.])}, [tensor([2.]), 3.0]))
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Tree = Any  # torch.Tensor | dict[str, Tree] | list[Tree] | tuple[Tree, ...] (other leaves pass through)


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree) -> Tree:
    """`fn` applied to every tensor of `tree`; containers rebuilt with the same type, other leaves kept."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, tree_map(fn, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of `tree`, in order."""
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t), tree)
    return out


def flatten(tree: Tree, batched: bool = False) -> torch.Tensor:
    """The tensors of `tree` (`leaves` order) as one flat vector (n,); `batched`: each tensor has a leading
    task dim T, giving (T, n) rows. The one flatten of mrml (parameter dicts, solver vectors, heads)."""
    ts = leaves(tree)
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=1)
    return torch.cat([t.reshape(-1) for t in ts])


def unflatten(v: torch.Tensor, like: Tree, batched: bool = False) -> Tree:
    """The inverse of `flatten`: `like`'s structure holding views of `v` shaped as its tensors (`batched`:
    v is (T, n) rows and each tensor of `like` has the leading task dim)."""
    pos = 0

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        n = t[0].numel() if batched else t.numel()
        part = v[:, pos : pos + n] if batched else v[pos : pos + n]
        pos += n
        return part.reshape(t.shape)

    return tree_map(take, like)


def detach(tree: Tree) -> Tree:
    """Every tensor of `tree` detached."""
    return tree_map(torch.Tensor.detach, tree)


def to(tree: Tree, device: torch.device | str, dtype: torch.dtype | None = None) -> Tree:
    """Every tensor moved to `device`; floating-point ones also cast to `dtype` when given."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    return tree_map(move, tree)


def leading_size(tree: Tree) -> int:
    """Size of dim 0 (the examples) of the first tensor of `tree`."""
    ts = leaves(tree)
    if not ts:
        raise ValueError("expected a tensor, or a dict/list/tuple holding tensors (got no tensor)")
    return int(ts[0].shape[0])


def stack(trees: list[Tree]) -> Tree:
    """Trees of equal structure stacked tensor by tensor along a new dim 0."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(trees)
    if isinstance(first, dict):
        return type(first)((k, stack([t[k] for t in trees])) for k in first)
    if isinstance(first, (list, tuple)):
        parts = [stack([t[i] for t in trees]) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    return first


def is_flat_dict(tree: Tree) -> bool:
    """Whether `tree` is a dict whose values are all tensors (the form `mrml.functional` works on)."""
    return isinstance(tree, dict) and all(isinstance(v, torch.Tensor) for v in tree.values())


def leaf_dict(tree: Tree) -> dict[str, torch.Tensor]:
    """The tensors of `tree` as a flat dict: a flat dict of tensors as it is, any other tree keyed by
    position ("0", "1", ... in `leaves` order). `rebuild(tree, d.values())` is the inverse."""
    if is_flat_dict(tree):
        return tree
    return {str(i): t for i, t in enumerate(leaves(tree))}


def rebuild(like: Tree, values: Any) -> Tree:
    """`like`'s structure with its tensors replaced, in `leaves` order, by `values` (any iterable, e.g.
    a `leaf_dict`'s values; None allowed); other leaves kept."""
    it = iter(values)
    return tree_map(lambda _: next(it), like)
