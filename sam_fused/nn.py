"""Helpers for the models SAM trains: BatchNorm statistics and ASAM's parameter groups.

``frozen_running_stats(model)``
    A context manager for the second forward pass (at w + e): every BatchNorm layer normalizes
    with the batch's statistics as usual in training, but its running mean, running variance and
    ``num_batches_tracked`` are left as they are. So after a SAM step they equal those after one
    plain forward at w, as if the optimizer had taken one step, not two.
``norm_layer_param_groups(model, **group_options)``
    SAM-ON's param groups (Mueller et al., NeurIPS 2023): the normalization layers' parameters
    perturbed (and in the norm), every other parameter in a group with ``perturb=False``.
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


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, nn.modules.instancenorm._InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer: torch's LayerNorm, RMSNorm, GroupNorm, BatchNorm and InstanceNorm
    (and subclasses), or a module of another library whose class name ends in ``Norm``
    (``LlamaRMSNorm``, ``T5LayerNorm``: libraries define their own)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def norm_layer_param_groups(model: nn.Module, include_lora: bool = True, **group_options) -> list[dict]:
    """Two param groups for ``FusedSAM``: the parameters of every normalization layer
    (:func:`is_norm_layer`; with ``include_lora``, also parameters named ``*lora_*``, the adapters
    of peft's LoRA) perturbed as usual, the others with ``perturb=False``: left where they are and
    out of the norm, so the norm is over the perturbed parameters alone (SAM-ON). ``group_options``
    (lr, weight_decay, rho, ...) go into both. Parameters that do not require grad are left out; an
    empty group is omitted."""
    norm_params = {id(p) for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
    perturbed, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        on = id(p) in norm_params or (include_lora and "lora_" in name)
        (perturbed if on else others).append(p)
    groups = [dict(group_options, params=perturbed, perturb=True), dict(group_options, params=others, perturb=False)]
    return [g for g in groups if g["params"]]
