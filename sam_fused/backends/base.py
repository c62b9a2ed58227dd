"""What every backend shares: the cached step plans (and with them the backups), and the contract.

**The SAM contract** (FusedSAM, GSAM, LookSAM): a backend implements the passes of a SAM step over a
:class:`~sam_fused.plan.StepPlan`:

``perturb(plan, reduce_sq, inv_scale)``
    the sum of squares of the (ASAM-weighted) gradients into a 0-dim fp64 device tensor (with
    AMP's ``inv_scale``, a one-element fp32 device tensor, the gradients are unscaled as read);
    ``reduce_sq(sq)`` (optional) may change it in place (a distributed all-reduce); then the
    norm = sqrt(sq) (fp32) and, per parameter, ``backup = w; w += e``. Returns the norm tensor.
``restore(plan)``
    every parameter of the plan back to its backup, bit-identically.
``restore_and_update(perturbed, plan, amp, combo)``
    restore what ``perturbed`` perturbed (nothing when None: a plain step) and apply the base
    optimizer with the current gradients (those of ``plan``); ``amp`` = (inv_scale, found_inf)
    device tensors or None: the gradients are multiplied by inv_scale, and a non-zero found_inf
    leaves parameters and state as restored. ``combo`` (a :class:`Combo`, GSAM and LookSAM): the
    update uses ``c0 * g + c1 * aux`` and may rewrite ``aux = c2 * g + c3 * aux``.

The SAM variants' extra reductions and buffers ride in the same passes: ``perturb(..., save=)``
also writes the (unscaled) gradient into the ``save`` buffers, and ``dots(plan, aux, reduce,
inv_scale)`` sums ``g.g, g.aux, aux.aux`` over every parameter with a gradient into a 3-element
fp32 device tensor (``reduce`` may change it in place: the FSDP2 all-reduce).

**The Momentum-SAM contract** (MSAM; its step order in ``optim/msam.py``, its reference ops in
``reference.py``):

``msam_prepare(kind, plan)``
    checks the state of the parameters the kernels would take and returns a callable making the
    (bucket, update) launches, or None (no fused launches: the reference ops take every parameter);
``msam_update(launches, inv, inv_next, amp, extra, device)``
    the first pass over (bucket, update, restore_rho) launches (``restore_rho``: the rho of the
    perturbation to undo, the one that made it whatever the group says now; None: nothing to undo):
    restore, update, and the sum of squares of the new first moments (plus ``extra``, the reference
    ops' share), returned; ``inv_next`` written from it;
``msam_perturb(bucket, inv_next, amp)``
    the second pass: ``w -= rho * inv_next * m``.

**The universal contract** (Frob/Trace/Det-SAM) is ``universal_reference.UniversalTorchBackend``'s
sample passes, with the Triton backend beside it.

Every check happens before the first write; no pass synchronizes with the device unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..distributed import local
from ..plan import Buffers, PlanCache, StepPlan
from .amp import Amp



@dataclass
class Combo:
    """The gradient combination of GSAM and LookSAM, applied inside the update pass.

    ``coef`` is a ``[n_groups, 4]`` fp32 tensor on the parameters' device, row ``i`` = (c0, c1, c2,
    c3) for param group ``i``: the update reads ``c0 * g + c1 * aux`` in place of the gradient g
    (unscaled first with AMP) and, with ``write``, stores ``aux = c2 * g + c3 * aux``. ``aux`` holds
    one parameter-sized buffer per parameter (keyed by the parameter)."""

    aux: Buffers
    coef: Tensor
    write: bool = False


@dataclass
class GroupWork:
    """The parameters of one param group that have a gradient in this step, in group order."""

    index: int
    group: dict
    params: list[Tensor] = field(default_factory=list)


class Backend:
    """Base of the backends: owns the plan cache of its optimizer (and so the backups)."""

    name = "base"
    dtypes: tuple[torch.dtype, ...] = ()  # dtypes the kernels index flat; others take the reference ops

    def __init__(self, optimizer) -> None:
        self.opt = optimizer
        self.plans = PlanCache(self.dtypes, getattr(optimizer, "_keeps_backups", True))

    @property
    def backups(self) -> Buffers:
        return self.plans.backups

    def backup_for(self, p: Tensor) -> Tensor:
        return self.plans.backups.get(p)

    def plan(self, skip: frozenset | None = None) -> StepPlan:
        """The plan of the parameters with a gradient; ``skip``: indices of groups left out."""
        return self.plans.plan(self.opt.param_groups, skip)

    def invalidate(self) -> None:
        """Parameters, groups or optimizer state were replaced: drop every cached plan."""
        self.plans.invalidate()

    @staticmethod
    def norm_device(work) -> torch.device:
        return work[0].params[0].device

    def perturb(self, plan: StepPlan, reduce_sq: Callable[[Tensor], None] | None = None,
                inv_scale: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def restore(self, plan: StepPlan) -> None:
        raise NotImplementedError

    def restore_and_update(self, perturbed: StepPlan | None, plan: StepPlan, amp: Amp | None = None,
                           combo: Combo | None = None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ Momentum-SAM
    def msam_prepare(self, kind: str, plan: StepPlan):
        """Momentum-SAM: check the state of the parameters the kernels would take (raises before any
        write) and return a callable making the (bucket, update) launches, or None: no fused
        launches (the reference ops take every parameter)."""
        return None

    def msam_update(self, launches, inv: Tensor, inv_next: Tensor, amp: Amp | None, extra: Tensor | None,
                    device: torch.device) -> Tensor:
        """Momentum-SAM's first pass over fused ``launches`` ((bucket, update, restore_rho) triples;
        none when the reference ops did every parameter and summed ``extra``): returns the sum of
        squares of the new first moments (fp64, 0-dim, on ``device``) and writes ``inv_next``."""
        raise NotImplementedError(f"backend {self.name!r} has no Momentum-SAM pass")

    def msam_perturb(self, bucket, inv_next: Tensor, amp: Amp | None) -> None:
        """Momentum-SAM's second pass over a fused launch's bucket: ``w -= rho * inv_next * m``."""
        raise NotImplementedError

    def dots(self, plan: StepPlan, aux: Buffers, reduce=None, inv_scale: Tensor | None = None) -> Tensor:
        """``[sum g.g, sum g.aux, sum aux.aux]`` over the plan's parameters, then ``reduce`` (the
        FSDP2 all-reduce) in place; a 3-element fp32 device tensor."""
        out = self.local_dots(plan, aux, inv_scale)
        if reduce is not None:
            reduce(out)
        return out

    def local_dots(self, plan: StepPlan, aux: Buffers, inv_scale: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _dots_out(self, device: torch.device) -> Tensor:
        out = getattr(self, "_dots", None)
        if out is None or out.device != device:
            out = self._dots = torch.zeros(3, dtype=torch.float32, device=device)
        return out


def unhooked_step(base: torch.optim.Optimizer) -> None:
    """``base.step()`` without torch.optim's global step hooks: they saw this step when it entered
    the SAM optimizer's own ``step()`` (or ``second_step()``), and to them one step is one step,
    however many optimizers it runs inside. Hooks registered on ``base`` itself still run."""
    step = type(base).step
    inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if inner is None:
        base.step()
        return
    for hook in list(base._optimizer_step_pre_hooks.values()):
        hook(base, (), {})
    inner(base)
    for hook in list(base._optimizer_step_post_hooks.values()):
        hook(base, (), {})


def base_step(opt, plan: StepPlan, amp: Amp | None, combo: Combo | None = None) -> None:
    """The base optimizer's own ``step()``; with ``amp``, on unscaled gradients, skipped when
    found_inf is set (one host read of found_inf: this path is not capturable). With ``combo``,
    the gradients are first rewritten to the combination (``combine_grads``)."""
    if combo is not None:
        if amp is not None and float(amp[1]) != 0.0:
            return
        combine_grads(opt, plan, combo, None if amp is None else amp[0])
        amp = None
    if amp is not None:
        inv_scale, found_inf = amp
        if float(found_inf) != 0.0:
            return
        grads = [p.grad for p in plan.active]
        if grads:
            torch._foreach_mul_(grads, inv_scale.reshape(()))
    unhooked_step(opt.base_optimizer)


def combine_grads(opt, plan: StepPlan, combo: Combo, inv_scale: Tensor | None = None) -> None:
    """The reference combination, in place: per parameter with a gradient, in fp32 (fp64 for fp64
    parameters), ``x = g * inv_scale``, ``aux = c2 x + c3 aux`` (with ``combo.write``) and
    ``g = c0 x + c1 aux`` (with the old aux)."""
    for index, group in enumerate(opt.param_groups):
        c = combo.coef[index]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = local(p.grad)
            a = combo.aux.get(p)
            dt = torch.float64 if g.dtype == torch.float64 else torch.float32
            x = g.to(dt)
            if inv_scale is not None:
                x = x * inv_scale.reshape(()).to(dt)
            ad = a.to(dt)
            cd = c.to(dt)
            combined = cd[0] * x + cd[1] * ad
            if combo.write:
                a.copy_(cd[2] * x + cd[3] * ad)
            g.copy_(combined)


__all__ = ["Backend", "Combo", "GroupWork", "base_step", "combine_grads", "unhooked_step"]
