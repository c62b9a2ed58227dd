"""LookSAM (Liu et al., CVPR 2022), fused: SAM every k-th step, its sharpness direction reused between.

Through ``step(closure)``: steps 0, k, 2k, ... are SAM steps (two forward/backward passes) that
also keep

    g_v = g_s - (<g, g_s> / (||g||^2 + eps)) * g           g at w, g_s at w + e, eps = 1e-12

(the part of the SAM gradient orthogonal to the plain one; inner product and norm global over
every parameter); the steps in between take one forward/backward and update with

    g + alpha * (||g|| / (||g_v|| + eps)) * g_v            (alpha per param group).

Fused: the SAM step saves g in its perturb pass, one pass reads g_s and g for their three sums,
and the restore + update pass both updates with g_s and writes g_v; a step in between runs one
pass over g and g_v for the sums and one update pass that reads g_v beside g.

``g_v`` is algorithm state: ``state_dict()`` holds it (``"looksam_gv"``, by parameter index) and a
resumed run continues identically. Memory: two parameter-sized buffers more than SGD (g_v and the
saved g of a SAM step, in the parameter's dtype; the two swap roles at each SAM step, so a step
that fails half-way leaves g_v as it was). Bytes per parameter with SGD-momentum in fp32: a SAM
step 4 + 20 + 8 + 28 = 60 B (SAM: 40), a step in between 8 + 24 = 32 B (SGD: 20).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..backends.base import Combo
from ..constants import NORM_EPS
from ..plan import StepPlan, ZeroBuffers
from .gsam import group_values, zero_unsaved
from .sam import FusedSAM, _check_nonneg, _eager, _unwrapping


_NO_SCALER = (
    "LookSAM does not take a GradScaler (its steps in between run through step(closure), which a scaler "
    "cannot drive): use bf16 autocast, which needs no scaler"
)


class _FiniteFlag:
    """Whether a device scalar (the first step's norm) is finite, known on the host at the second
    step without waiting for the device: the check is copied to pinned host memory right after the
    norm is computed, and by the second step (after the second forward and backward were queued
    behind it) the copy has long finished; the event wait then costs nothing."""

    def __init__(self) -> None:
        self._host: Tensor | None = None
        self._event = None

    def record(self, value: Tensor | None) -> None:
        if value is None:  # nothing had a gradient: nothing to distrust
            self._host, self._event = torch.ones((), dtype=torch.bool), None
            return
        ok = torch.isfinite(value)
        if value.device.type != "cuda":
            self._host, self._event = ok, None
            return
        if self._event is None or self._host is None or not self._host.is_pinned():
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host.copy_(ok, non_blocking=True)
        self._event.record()

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return self._host is None or bool(self._host)


class LookSAM(FusedSAM):
    """LookSAM: a SAM step every ``k`` steps, the steps in between reuse its sharpness direction.

    Args:
        params, base_optimizer, rho, adaptive, eta, backend, **base_kwargs: as :class:`FusedSAM`.
        k: a SAM step every ``k`` calls of ``step(closure)`` (steps 0, k, 2k, ...), >= 1.
        alpha: weight of the reused direction on the other steps (>= 0; per param group).

    ``first_step`` / ``second_step`` called by hand make a SAM step (and refresh g_v); the steps
    in between exist only through ``step(closure)``, whose count is kept in the param groups
    (``"sam_step"``), so a checkpoint resumes the schedule.

    Memory: three parameter-sized buffers besides the base optimizer's state (SAM's backup, g_v and
    the saved first gradient). Traffic with SGD-momentum in fp32: 60 B per parameter on a SAM step
    (SAM 40), 32 B on a step in between (SGD 20).
    """

    _group_keys = ("rho", "adaptive", "eta", "alpha")

    def __init__(self, params: Iterable, base_optimizer: type = torch.optim.SGD, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, adaptive: bool = False, eta: float = 0.0, backend: str | None = None,
                 **base_kwargs) -> None:
        _check_nonneg("alpha", alpha)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self._variant_defaults = {"alpha": alpha}
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, backend=backend, interval=k,
                         **base_kwargs)
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._gv = ZeroBuffers()
        self._save = ZeroBuffers()
        self._values: dict = {}
        self._first_ok = _FiniteFlag()

    @property
    def k(self) -> int:
        return self.interval

    _subsets = False
    _preconditions = False

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        _check_nonneg("alpha", group["alpha"])

    # ------------------------------------------------------------------ a SAM step
    def _combination(self, plan: StepPlan, amp) -> Combo | None:
        """Update with g_s as it is; write g_v = g_s - (<g, g_s> / ||g||^2) g into the saved-g buffers,
        which then become g_v (the old g_v buffers take the next SAM step's g). After a first
        gradient with an inf or NaN (no perturbation was made, nothing was saved), the update
        uses g_s and g_v stays as it was."""
        if not plan.active or not self._first_ok.read():
            return None
        saved = self._save
        zero_unsaved(self._perturbed, plan, saved)
        inv_scale = None if amp is None else amp[0]
        dots = self._backend.dots(plan, saved, self._backend.plans.params.reduce_sq, inv_scale)
        gs_g, g_g = dots[1], dots[2]
        one = torch.ones_like(self._group_values(dots.device))
        zero = torch.zeros_like(one)
        proj = (gs_g / (g_g + NORM_EPS)) * one
        coef = torch.stack([one, zero, one, -proj], dim=1)
        self._pending_swap = plan
        return Combo(saved, coef, write=True)

    def first_step(self, zero_grad: bool = False, *, grad_scaler=None) -> None:
        if grad_scaler is not None:
            raise NotImplementedError(_NO_SCALER)
        super().first_step(zero_grad)
        self._first_ok.record(self._grad_norm)

    @_unwrapping
    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scale=None, found_inf=None) -> None:
        if grad_scale is not None or found_inf is not None:
            raise NotImplementedError(_NO_SCALER)
        self._pending_swap = None
        super().second_step(zero_grad)
        plan, self._pending_swap = self._pending_swap, None
        if plan is not None:  # the update wrote g_v into the saved-g buffers: they are g_v now
            self._keep_unstepped(plan)
            self._gv, self._save = self._save, self._gv

    def _keep_unstepped(self, plan: StepPlan) -> None:
        """Parameters without a gradient in this SAM step keep their g_v."""
        total = sum(len(g["params"]) for g in self.param_groups)
        if len(plan.active) == total:
            return
        stepped = {id(p) for p in plan.active}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in stepped and p in self._gv._bufs:
                    self._save.get(p).copy_(self._gv.get(p))

    def _group_values(self, device: torch.device) -> Tensor:
        return group_values(self, "alpha", device, self._values)

    # ------------------------------------------------------------------ the steps in between
    @_eager
    @torch.no_grad()
    def _plain_step(self) -> None:
        """g + alpha * ||g|| / ||g_v|| * g_v, fused into the update (one pass for the sums first)."""
        plan = self._step_plan()
        try:
            if not plan.active:
                return
            dots = self._backend.dots(plan, self._gv, self._backend.plans.params.reduce_sq)
            g_g, v_v = dots[0], dots[2]
            alpha = self._group_values(dots.device)
            zero = torch.zeros_like(alpha)
            scale = alpha * (g_g.sqrt() / (v_v.sqrt() + NORM_EPS))
            coef = torch.stack([torch.ones_like(alpha), scale, zero, zero], dim=1)
            self._backend.restore_and_update(None, plan, None, Combo(self._gv, coef))
        finally:
            self._backend.plans.end_pass()

    # ------------------------------------------------------------------ state
    def _indexed(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """The base optimizer's state dict, plus ``"looksam_gv"``: {parameter index: g_v}."""
        state = super().state_dict()
        gv = self._gv._bufs
        state["looksam_gv"] = {i: gv[p] for i, p in enumerate(self._indexed()) if p in gv}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("looksam_gv", {})
        params = self._indexed()
        for i, t in saved.items():  # every check before anything is loaded
            if not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"looksam_gv has an entry for parameter {i!r}; the optimizer has {len(params)}")
            if not isinstance(t, Tensor) or t.shape != params[i].shape:
                what = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"looksam_gv of parameter {i} is {what}, the parameter {tuple(params[i].shape)}")
        super().load_state_dict(state_dict)
        self._fresh_state()
        for i, t in saved.items():
            self._gv.get(params[i]).copy_(t)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        gv = self._gv._bufs
        state["_gv_values"] = [(i, gv[p].clone()) for i, p in enumerate(self._indexed()) if p in gv]
        for key in ("_gv", "_save", "_values", "_pending_swap", "_first_ok"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        values = state.pop("_gv_values", [])
        super().__setstate__(state)
        self._fresh_state()
        params = self._indexed()
        for i, t in values:
            self._gv.get(params[i]).copy_(t)
