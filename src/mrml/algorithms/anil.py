"""ANIL (Raghu et al. 2020): almost no inner loop -- only the head adapts, its init is learned.

The backbone features are computed once per task with gradient (the trunk); K head steps are
unrolled on those attached features with `create_graph=True`, and the query loss after them is
backpropagated to the head init and, through the features, once through the backbone. With
`config.recompute_features` the split puts the whole network in the adapted part, so every inner
step re-runs the backbone with gradient (the form of the paper's code): the same meta-gradient, at
K times the backbone cost. `config.first_order` drops the second-order terms (see `maml.py`).

Defaults: inner "head", no regulariser (l2 = 0). Test-time adaptation: the training inner loop
(`inner_steps` at `inner_lr`, from the learned head init), as for MAML.
"""
from __future__ import annotations

from .maml import Unrolled


class ANIL(Unrolled):
    """ANIL: unrolled head steps from a learned head init; test-time adaptation = training inner loop."""

    name = "anil"
    learns_inner_init = True
    default_inner = "head"
    default_l2 = 0.0
