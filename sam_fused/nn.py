"""Helpers for the models SAM trains: BatchNorm statistics and ASAM's parameter groups.

``frozen_running_stats(model)``
    A context manager for the second forward pass (at w + e): every BatchNorm layer normalizes
    with the batch's statistics as usual in training, but its running mean, running variance and
    ``num_batches_tracked`` are left as they are. So after a SAM step they equal those after one
    plain forward at w, as if the optimizer had taken one step, not two.
``asam_param_groups(model, eta=0.01)``
    Param groups the way the ASAM authors' code treats a model: ``T = |w| + eta`` (adaptive) for
    the parameters whose name contains "weight", plain SAM (``T = 1``) for the others (biases,
    and BatchNorm's shifts); the norm stays global over both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers (and their subclasses, SyncBatchNorm included) in
    training mode use batch statistics without updating their running statistics.

    Example::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        # torch's BatchNorm passes no running buffers to batch_norm (and does not count the batch)
        # when track_running_stats is off; in training mode it normalizes with the batch as before
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def asam_param_groups(model: nn.Module, eta: float = 0.01, **group_options) -> list[dict]:
    """Two param groups for ``FusedSAM``: parameters named ``*weight*`` with ``adaptive=True`` and
    ``eta``, the others with ``adaptive=False``; ``group_options`` (lr, weight_decay, rho, ...) go
    into both. Parameters that do not require grad are left out; an empty group is omitted."""
    weights, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (weights if "weight" in name else others).append(p)
    groups = [dict(group_options, params=weights, adaptive=True, eta=eta),
              dict(group_options, params=others, adaptive=False)]
    return [g for g in groups if g["params"]]
