"""SAM with ``torch.distributed``: DDP in its two forms, and FSDP2 (and the helpers the plan, the
backends and the optimizers use for FSDP2's DTensor parameters: ``local``, ``shard_slices``,
``shard_start``, ``mesh_mean``, ``sharded_reduce``).

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
import sys
from typing import Iterator

import torch
from torch import Tensor


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


def _dtensor_type():
    """``torch.distributed.tensor.DTensor`` when that module is loaded, else None. It is never
    imported here (a third of a second, with sympy): a DTensor parameter exists only once the
    program has imported it (FSDP2's ``fully_shard`` does)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(t: Tensor | None) -> Tensor | None:
    """The tensor the kernels work on: a DTensor's local shard (FSDP2), any other tensor itself."""
    if type(t).__name__ == "DTensor" and type(t) is _dtensor_type():
        return t._local_tensor
    return t


def shard_slices(p: Tensor) -> tuple[slice, ...] | None:
    """Where a DTensor's local shard sits in the global tensor (one slice per dimension); None for
    any other tensor."""
    if type(p).__name__ != "DTensor" or type(p) is not _dtensor_type():
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def shard_start(p: Tensor) -> int:
    """The index, in the global tensor flattened in row-major order, of a DTensor's first local
    element (0 for any other tensor); refuses a shard that is not one contiguous range there."""
    where = shard_slices(p)
    if where is None:
        return 0
    rest = 1
    for n in p.shape[1:]:
        rest *= n
    if any(sl.start != 0 or sl.stop != n for sl, n in zip(where[1:], p.shape[1:])):
        raise ValueError(f"a DTensor sharded as {p.placements}: only sharding on dimension 0 (FSDP2's) is supported here")
    return where[0].start * rest


def mesh_mean(loss: Tensor, p: Tensor) -> Tensor:
    """The mean of ``loss`` over every rank of DTensor ``p``'s mesh (each has its own data), in
    place, on the device."""
    import torch.distributed as dist

    for dim in range(p.device_mesh.ndim):
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=p.device_mesh.get_group(dim))
    return loss


def sharded_reduce(params: list[Tensor]):
    """(whether the parameters are DTensors (FSDP2), and a function that sums a 0-dim tensor over
    the process groups of the mesh dimensions they are sharded on, in place, on the device, with
    no host synchronization, so that a sum of local squares becomes the global one, or None). Refuses a mix of DTensor and plain parameters, or of meshes and
    placements: the sum would count some squares once and others once per rank."""
    DTensor = _dtensor_type()
    if DTensor is None or not params:
        return False, None
    from torch.distributed.tensor import Shard

    kinds = {type(p) is DTensor for p in params}
    if kinds != {True}:
        if True in kinds:
            raise ValueError(
                "some parameters are DTensors (FSDP2) and others are not: SAM's global norm needs all of "
                "one optimizer's parameters sharded the same way (one optimizer per kind, or fully_shard the rest)"
            )
        return False, None
    first = params[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    for p in params:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(
                f"DTensor parameters on different meshes or placements ({p.placements} vs {placements}): "
                "SAM's global norm needs one sharding for all of an optimizer's parameters"
            )
    if any(not (isinstance(pl, Shard) or pl.is_replicate()) for pl in placements):
        raise ValueError(f"parameters placed as {placements}: only sharded and replicated dimensions are supported")
    groups = [mesh.get_group(dim) for dim, pl in enumerate(placements) if isinstance(pl, Shard)]
    if not groups:
        return True, None

    def reduce(sq: Tensor) -> None:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)

    return True, reduce


__all__ = ["first_pass", "local", "shard_slices", "shard_start", "mesh_mean", "sharded_reduce"]
