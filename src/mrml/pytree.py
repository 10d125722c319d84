"""Nested model inputs: a tensor, or dicts, lists and tuples of them (a text model's
`{"input_ids": ..., "attention_mask": ...}`). Small, public-API-only helpers over such trees.

Example:
    >>> import torch
    >>> from mrml.pytree import tree_map, leading_size
    >>> batch = {"ids": torch.zeros(4, 7, dtype=torch.long), "mask": torch.ones(4, 7)}
    >>> leading_size(batch)
    4
    >>> sorted(tree_map(lambda t: t[:2], batch)["mask"].shape)
    [2, 7]
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
