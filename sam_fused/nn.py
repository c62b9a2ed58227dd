"""Helpers for the models SAM trains: BatchNorm statistics, parameter groups, SAM phases.

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
``phase_window(start, stop, total_steps)``
    FusedSAM's ``phase`` for SAM on the fractions ``[start, stop)`` of training: "SAM for the last
    25% of 1000 steps" is ``phase_window(0.75, 1.0, 1000) == (750, None)``.
"""

from __future__ import annotations

import contextlib
import math
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


def check_phase_fractions(start: float, stop: float) -> tuple[float, float]:
    """``(start, stop)`` as floats when they are fractions of training with ``0 <= start < stop <=
    1``; else a ValueError that says so."""
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"the SAM phase's {name} must be a fraction of the training steps (a number in [0, 1]), "
                             f"got {value!r}")
    if not 0.0 <= start < stop <= 1.0:
        raise ValueError(f"the SAM phase must be fractions of training with 0 <= start < stop <= 1, got start {start!r} "
                         f"and stop {stop!r}")
    return float(start), float(stop)


def phase_window(start: float, stop: float, total_steps: int) -> tuple[int, int | None]:
    """FusedSAM's ``phase=(first, last)`` for SAM on the fractions ``[start, stop)`` of
    ``total_steps`` optimizer steps: step ``s`` (counted from 0) is in it when ``start <= s /
    total_steps < stop``; ``last`` is None (no end) when ``stop`` is 1. Refused when the window
    holds no step."""
    start, stop = check_phase_fractions(start, stop)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    first = math.ceil(round(start * total_steps, 9))  # round: 0.1 * 30 is 3.0000000000000004, step 3 is in
    last = None if stop == 1.0 else math.ceil(round(stop * total_steps, 9))
    end = total_steps if last is None else last
    if first >= end:
        raise ValueError(f"the SAM phase [{start:g}, {stop:g}) of {total_steps} training steps holds no step (steps "
                         f"{first} to {end}): widen it or train longer")
    return first, last
