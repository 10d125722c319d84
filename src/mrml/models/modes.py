"""Module modes for test-time adaptation: train-only layers off, batch norm as in training, all restored.

`evaluation_modes(model)` is the context `MetaAlgorithm.evaluate`, `adapt` and `adapted_parameters`
run in. Every submodule is put in eval mode (dropout and any other layer that reads `.training` act
as at inference), except batch norm: its normalisation follows the documented convention -- a batch
norm in train mode normalises by the statistics of the batch it sees, as in meta-training (MAML's
convention; the built-in backbones' batch norms keep no running statistics at all) -- and its running
statistics are not updated by the evaluation. A batch norm the user put in eval mode keeps using its
running statistics; instance norm keeps its mode. Each submodule's own `.training` flag (and batch norm's `track_running_stats`) is
restored on exit, also when the body raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
_NORM = nn.modules.batchnorm._NormBase  # batch and instance norm


@contextmanager
def evaluation_modes(model: nn.Module) -> Iterator[None]:
    """Run the body with `model` in evaluation modes (see the module docstring), restored afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        >>> net[2].eval()  # a mode set by hand is restored as it was
        Dropout(p=0.5, inplace=False)
        >>> with evaluation_modes(net):
        ...     [m.training for m in net], net[1].track_running_stats
        ([False, True, False], False)
        >>> [m.training for m in net], net[1].track_running_stats
        ([True, True, False], True)
    """
    saved = [(m, m.training, m.track_running_stats if isinstance(m, _NORM) else None) for m in model.modules()]
    try:
        for m, training, _ in saved:
            if isinstance(m, _BN) and training:
                m.track_running_stats = False  # batch statistics, running ones left untouched
            elif not isinstance(m, _NORM):  # instance norm keeps its mode: per-instance statistics in training
                m.training = False
        yield
    finally:
        for m, training, tracking in saved:
            m.training = training
            if tracking is not None:
                m.track_running_stats = tracking
