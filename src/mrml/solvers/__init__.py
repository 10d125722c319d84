"""Solvers below the functional core: closed forms and Newton for stacked linear heads (`head`), Newton-CG
and the inner-solve record (`newton`). Conjugate gradient and the Neumann series are in `mrml.implicit`.

Nothing here imports from `mrml.algorithms` or `mrml.functional`."""
from __future__ import annotations

from .head import HeadLayout, HeadProblem, newton_heads, solve_costs, spd_solve
from .newton import INNER_SOLVERS, InnerSolveInfo, newton_cg

__all__ = ["HeadLayout", "HeadProblem", "INNER_SOLVERS", "InnerSolveInfo", "newton_cg", "newton_heads", "solve_costs",
           "spd_solve"]
