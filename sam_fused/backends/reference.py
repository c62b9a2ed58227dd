"""The reference backend: plain PyTorch, any device, the oracle every fast path is checked against.

SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021) first step, per parameter ``w`` with
gradient ``g`` and the hyperparameters of its param group:

    g     = grad * inv_scale  (with AMP's GradScaler; else the gradient as it is)
    T     = |w| + eta         (ASAM)      T = 1  (SAM)
    norm  = || T * g ||_2     over every parameter with a grad, in every group: the sum of
                              squares in fp64 (finite whenever the norm fits fp32), the norm fp32
    e     = rho * T^2 * g / (norm + 1e-12)
    w    <- w + e             (skipped, weights untouched, when norm is not finite)

The second step copies the backup back (bit-exact) and runs ``base_optimizer.step()``.

GSAM and LookSAM: ``save`` keeps ``g`` (unscaled) beside the backup (not written when the norm is
not finite: the buffer keeps its values, as the weights do); ``dots`` sums ``g.g``,
``g.aux`` and ``aux.aux`` (fp32, each parameter's sum in its math dtype); the combination rewrites
each gradient to ``c0 g + c1 aux`` before the base step (``base.combine_grads``).
Every operation here is an ordinary torch op on one tensor, written to be read, not to be fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import NORM_EPS as EPS
from ..distributed import local
from ..plan import StepPlan
from .base import Amp, Backend, Combo, base_step, check_all_state


def _math_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _unscaled(g: Tensor, inv_scale: Tensor | None) -> Tensor:
    return g if inv_scale is None else g * inv_scale.to(device=g.device, dtype=g.dtype).reshape(())


def grad_sq_sum(pairs, device: torch.device, inv_scale: Tensor | None = None) -> Tensor:
    """Sum of squares of the weighted gradients of ``(group, param, ...)``
    tuples, an fp64 0-dim tensor on ``device``, every product and sum in fp64: it is finite whenever
    the norm fits fp32 (an fp32 sum of squares overflows from norms of 1.8e19 on)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group, p, *_ in pairs:
        g = local(p.grad)
        x = _unscaled(g.to(torch.float64), inv_scale)
        if group["adaptive"]:
            x = x * (local(p).detach().to(torch.float64).abs() + group["eta"])
        total += x.square().sum().to(device)
    return total


def dots_sum(params, device: torch.device, aux, inv_scale: Tensor | None = None) -> Tensor:
    """``[sum g.g, sum g.aux, sum aux.aux]`` over ``params`` (each with a gradient; ``g`` unscaled
    by ``inv_scale``), an fp32 3-element tensor on ``device``."""
    total = torch.zeros(3, dtype=torch.float32, device=device)
    for p in params:
        g = local(p.grad)
        dt = _math_dtype(g)
        x = _unscaled(g.to(dt), inv_scale)
        a = aux.get(p).to(dt)
        part = torch.stack([x.square().sum(), (x * a).sum(), a.square().sum()])
        total += part.to(device=device, dtype=torch.float32)
    return total


def perturb_(group: dict, p: Tensor, backup: Tensor, norm: Tensor, inv_scale: Tensor | None = None,
             save: Tensor | None = None) -> None:
    """Copy ``p`` into ``backup`` (and the unscaled gradient into ``save`` when given), then
    ``p += e`` along ``p.grad`` (unscaled by AMP's ``inv_scale`` when given); ``p``
    is left as it was if ``norm`` is not finite. fp64 parameters are perturbed in fp64, the others
    in fp32."""
    g = local(p.grad)  # FSDP2: the local shards of the gradient and parameter
    p = local(p)
    backup.copy_(p.detach())
    dt = _math_dtype(p)
    norm = norm.to(device=p.device, dtype=dt)
    ok = torch.isfinite(norm)
    if save is not None:
        save.copy_(torch.where(ok, _unscaled(g.to(dt), inv_scale), save.to(dt)))
    scale = torch.where(ok, group["rho"] / (norm + EPS), torch.zeros_like(norm))
    w = p.detach().to(dt)
    g = _unscaled(g.to(dt), inv_scale)
    if group["adaptive"]:
        t = w.abs() + group["eta"]
        e = t * t * g * scale
    else:
        e = g * scale
    p.detach().copy_(torch.where(ok, w + e, w))


class TorchBackend(Backend):
    """Pure-PyTorch reference: one op per tensor, the base optimizer's own ``step()`` for the update.
    Every parameter takes the reference ops (``dtypes`` is empty: the plan puts all in ``slow``)."""

    name = "torch"

    def perturb(self, plan: StepPlan, reduce_sq=None, inv_scale=None, save=None) -> Tensor:
        sq = grad_sq_sum(plan.slow, plan.locals[0].device, inv_scale)
        if reduce_sq is not None:
            reduce_sq(sq)
        norm = sq.sqrt().float()
        for group, p, backup in plan.slow:
            perturb_(group, p, backup, norm, inv_scale, None if save is None else save.get(p))
        return norm

    def local_dots(self, plan: StepPlan, aux, inv_scale=None) -> Tensor:
        return dots_sum(plan.active, plan.locals[0].device, aux, inv_scale)

    def restore(self, plan: StepPlan | None) -> None:
        if plan is None:
            return
        for _, p, backup in plan.slow:
            local(p).detach().copy_(backup)

    def restore_and_update(self, perturbed: StepPlan | None, plan: StepPlan, amp: Amp | None = None,
                           combo: Combo | None = None) -> None:
        check_all_state(self.opt, plan)  # torch.optim would raise half-way, with state half-written
        self.restore(perturbed)
        base_step(self.opt, plan, amp, combo)
