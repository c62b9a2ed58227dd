"""GSAM: Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022), fused.

The first step perturbs as SAM does, along the gradient ``g`` at ``w``, and keeps ``g`` (written
in the same perturb pass). With ``g_p`` the gradient at ``w + e``, the update uses

    g_final = g_p - alpha * (g - cos * ||g|| * g_p / (||g_p|| + eps)),
    cos     = <g, g_p> / (||g|| ||g_p|| + eps),        eps = 1e-12,

the inner product and norms global over every parameter with a gradient, of the raw (unweighted)
gradients as the authors' code computes them; ``alpha`` is per param group. Written as
``c0 * g_p + c1 * g`` with ``c0 = 1 + alpha * cos * ||g|| / (||g_p|| + eps)`` and ``c1 = -alpha``,
it is applied inside the restore + update pass, after one pass that reads ``g_p`` and ``g`` for
their three sums (``<g_p, g_p>``, ``<g_p, g>``, ``<g, g>``); the coefficients are computed on the
device, so nothing waits for it.

Memory: one parameter-sized buffer more than SAM (the saved ``g``, in the parameter's dtype).
Bytes per parameter per step with SGD-momentum in fp32: norm 4 + perturb and save 20 + sums 8 +
update 24 = 56 B (SAM: 40).

rho can follow the learning rate as in the paper: :class:`RhoFollowsLR`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..backends.base import Combo
from ..constants import NORM_EPS
from ..plan import Buffers, StepPlan, ZeroBuffers
from .sam import FusedSAM, _check_nonneg


def group_values(opt, key: str, device: torch.device, cache: dict) -> Tensor:
    """The per-group values of ``key`` as an fp32 device tensor, uploaded only when they change."""
    values = tuple(float(g[key]) for g in opt.param_groups)
    hit = cache.get(key)
    if hit is None or hit[0] != values or hit[1].device != device:
        hit = cache[key] = (values, torch.tensor(values, dtype=torch.float32).to(device))
    return hit[1]


def zero_unsaved(perturbed: StepPlan | None, plan: StepPlan, saved: Buffers) -> None:
    """Parameters with a gradient now but none at the first step: their saved gradient is zero."""
    if perturbed is plan or perturbed is None:
        return
    before = {id(p) for p in perturbed.active}
    for p in plan.active:
        if id(p) not in before:
            saved.get(p).zero_()


class GSAM(FusedSAM):
    """Surrogate Gap Guided SAM: SAM's perturbation, an update that also descends the surrogate gap.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, **base_kwargs: as :class:`FusedSAM`
            (``adaptive`` weights the perturbation as ASAM; the decomposition uses the raw gradients).
        alpha: weight of the surrogate-gap term (>= 0; per param group). 0 is SAM.

    Used like FusedSAM: ``first_step`` / ``second_step``, or ``step(closure)``; with a GradScaler
    (``first_step(grad_scaler=)``, ``scaler.step(opt)``) the saved gradient is stored unscaled.

    Memory: two parameter-sized buffers besides the base optimizer's state (SAM's backup and the
    saved first gradient). Traffic with SGD-momentum in fp32: 56 B per parameter per step (SAM 40).
    """

    _group_keys = ("rho", "adaptive", "eta", "alpha")

    def __init__(self, params: Iterable, base_optimizer: type = torch.optim.SGD, rho: float = 0.05,
                 alpha: float = 0.4, adaptive: bool = False, eta: float = 0.0, backend: str | None = None,
                 **base_kwargs) -> None:
        _check_nonneg("alpha", alpha)
        self._variant_defaults = {"alpha": alpha}
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, backend=backend, **base_kwargs)
        self._save = ZeroBuffers()
        self._values: dict = {}

    _subsets = False
    _preconditions = False

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        _check_nonneg("alpha", group["alpha"])

    def _combination(self, plan: StepPlan, amp) -> Combo | None:
        if not plan.active:  # no gradient: nothing to combine (and no device to compute on)
            return None
        zero_unsaved(self._perturbed, plan, self._save)
        inv_scale = None if amp is None else amp[0]
        dots = self._backend.dots(plan, self._save, self._backend.plans.params.reduce_sq, inv_scale)
        gp_gp, gp_g, g_g = dots[0], dots[1], dots[2]
        norm_g, norm_gp = g_g.sqrt(), gp_gp.sqrt()
        cos = gp_g / (norm_g * norm_gp + NORM_EPS)
        ratio = cos * norm_g / (norm_gp + NORM_EPS)
        alpha = group_values(self, "alpha", dots.device, self._values)
        zero = torch.zeros_like(alpha)
        coef = torch.stack([1.0 + alpha * ratio, -alpha, zero, zero], dim=1)
        if self._grad_norm is not None:
            # a first gradient with an inf or NaN: no perturbation was made and nothing saved (the
            # buffer keeps finite values); the update is SAM's, with g_p alone. Decided on the device.
            sam = torch.stack([torch.ones_like(alpha), zero, zero, zero], dim=1)
            coef = torch.where(torch.isfinite(self._grad_norm.to(coef.device)), coef, sam)
        return Combo(self._save, coef)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._save = ZeroBuffers()
        self._values = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_save", None)
        state.pop("_values", None)
        return state


class RhoFollowsLR:
    """rho proportional to the learning rate, as GSAM's paper schedules it:

        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

    per param group, from that group's current ``lr``. Call ``step()`` after the LR scheduler's
    ``step()``. ``rho_max`` defaults to each group's rho when this object is made; ``lr_max`` to
    each group's lr then.

    Example::

        opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1)
        lrs = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        rhos = RhoFollowsLR(opt, rho_min=0.01)
        for epoch in range(100):
            ...
            lrs.step()
            rhos.step()
    """

    def __init__(self, optimizer, lr_max: float | None = None, lr_min: float = 0.0, rho_max: float | None = None,
                 rho_min: float = 0.0) -> None:
        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.lr_max = [float(g["lr"]) if lr_max is None else float(lr_max) for g in groups]
        self.rho_max = [float(g["rho"]) if rho_max is None else float(rho_max) for g in groups]
        self.lr_min, self.rho_min = float(lr_min), float(rho_min)
        _check_nonneg("rho_min", self.rho_min)
        for hi, rho in zip(self.lr_max, self.rho_max):
            if not hi > self.lr_min:
                raise ValueError(f"lr_max ({hi}) must be greater than lr_min ({self.lr_min})")
            _check_nonneg("rho_max", rho)

    def step(self) -> list[float]:
        """Set each group's rho from its lr; returns the new values."""
        values = []
        for group, hi, rho_hi in zip(self.optimizer.param_groups, self.lr_max, self.rho_max):
            t = (float(group["lr"]) - self.lr_min) / (hi - self.lr_min)
            rho = self.rho_min + (rho_hi - self.rho_min) * t
            group["rho"] = max(rho, 0.0)
            values.append(group["rho"])
        return values

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
