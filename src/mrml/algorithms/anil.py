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
    """ANIL: K head steps unrolled with graph on the trunk's features, from a learned head init; the
    query loss after them is differentiated through the steps (to the head init) and, once, through
    the trunk. No regulariser by default (l2 = 0). Test-time adaptation: the training inner loop.

    Args:
        model, loss, config, trunk, inner_loss: as for `MetaAlgorithm`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mrml import ANIL, AlgoConfig, Episode
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> learner = ANIL(model, "classification", AlgoConfig(inner_steps=5), trunk="0")  # model[2] adapts
        >>> learner.config.inner, len(learner.outer_parameters())  # the head init is learned too
        ('2.weight,2.bias', 4)
        >>> opt = torch.optim.SGD(learner.outer_parameters(), lr=0.1)
        >>> y = torch.arange(3).repeat(2)
        >>> ep = Episode(torch.randn(6, 4, dtype=torch.float64), y, torch.randn(6, 4, dtype=torch.float64), y)
        >>> stats = learner.meta_gradient([ep])
        >>> opt.step()
        >>> round(stats.loss, 2), sorted(stats.extra)
        (1.12, ['inner_lr'])
    """

    name = "anil"
    learns_inner_init = True
    default_inner = "head"
    default_l2 = 0.0
