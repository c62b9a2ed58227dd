"""The GradScaler protocol of the fused passes: ``Amp`` = (inv_scale, found_inf), one-element fp32
tensors on the parameters' device, and their check."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import StepPlan

Amp = tuple[Tensor, Tensor]  # (inv_scale, found_inf), 1-element fp32 tensors on the parameters' device


def check_amp(plan: StepPlan, amp: Amp | None) -> None:
    if amp is None:
        return
    for name, t in zip(("grad_scale", "found_inf"), amp):
        if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a one-element float32 tensor, got {t!r}")
        if plan.active and t.device != plan.active[0].device:
            raise ValueError(f"{name} is on {t.device}, the parameters on {plan.active[0].device}")


def passed_by_scaler(opt) -> tuple[Tensor, Tensor] | None:
    """What ``GradScaler.step(opt)`` hands an optimizer that sets ``_step_supports_amp_scaling``:
    (grad_scale, found_inf) as one-element fp32 tensors (grad_scale ones when ``scaler.unscale_(opt)``
    ran: the gradients are unscaled already), or None when the step was not called by a scaler."""
    if "found_inf" not in opt.__dict__:
        return None
    found_inf = opt.found_inf.reshape(1).to(torch.float32)
    scale = opt.__dict__.get("grad_scale")
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=found_inf.device), found_inf
    return scale.reshape(1).to(torch.float32), found_inf
