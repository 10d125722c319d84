"""Solvers below the functional core: closed forms and Newton for stacked linear heads (`head`).

Nothing here imports from `mrml.algorithms`."""
from __future__ import annotations

from .head import HeadInfo, HeadLayout, HeadProblem, newton_heads, solve_costs, spd_solve

__all__ = ["HeadInfo", "HeadLayout", "HeadProblem", "newton_heads", "solve_costs", "spd_solve"]
