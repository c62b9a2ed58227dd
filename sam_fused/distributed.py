"""SAM with ``torch.distributed``: DDP in its two forms, and FSDP2.

**DDP, global SAM** (the default): both backward passes are synchronized, so every rank perturbs
with the all-reduced gradient of the global batch and takes the same step: single-process SAM
on the global batch. Nothing to do beyond wrapping the model.

**DDP, m-sharpness** (Foret et al.'s per-device SAM, often the better generalizer): each rank
perturbs with the gradient of its own micro-batch of size m; only the second backward is
synchronized, so the update still uses one averaged gradient and the ranks stay identical. The
first forward *and* backward must run under ``no_sync()`` (DDP prepares its reducer in the
forward): :func:`first_pass` places it so that it cannot be got wrong::

    with first_pass(ddp_model, m_sharpness=True):
        loss_fn(ddp_model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(ddp_model(x), y).backward()       # synchronized
    opt.second_step(zero_grad=True)

**FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and gradients are DTensor shards.
``FusedSAM`` works on the local shards with every backend; the global norm is the square root of
one all-reduced scalar (the sum of the local squares), kept on the device. Optimizer state is
DTensor state, as torch.optim keeps it, so ``torch.distributed.checkpoint`` saves and loads it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def first_pass(model: torch.nn.Module, m_sharpness: bool = False) -> Iterator[None]:
    """Wrap SAM's first forward and backward. With ``m_sharpness=True`` and a
    ``DistributedDataParallel`` model, they run under ``model.no_sync()``: each rank's perturbation
    comes from its own gradient. Otherwise (global SAM, or a model that is not DDP and is not
    asked for m-sharpness) nothing changes. m-sharpness on a model that is not DDP is refused: an
    FSDP2 model's gradients are sharded, there is no per-rank full gradient to perturb with."""
    if not m_sharpness:
        yield
        return
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"m-sharpness needs a DistributedDataParallel model (got {type(model).__name__}): its per-rank "
            "perturbation comes from the unsynchronized gradient of the rank's own batch"
        )
    with model.no_sync():
        yield


__all__ = ["first_pass"]
