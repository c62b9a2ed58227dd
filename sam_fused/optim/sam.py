"""``FusedSAM``: Sharpness-Aware Minimization as a drop-in ``torch.optim`` optimizer (SAM, ASAM,
interval and randomized SAM)."""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from ..backends import BACKENDS
from ..backends.amp import check_amp, passed_by_scaler
from ..backends.base import Combo, unhooked_step
from ..plan import Buffers, StepPlan
from .base import BackwardWatch, SAMOptimizer, _called_by_dcp_state_init, _capturing, _check_nonneg, _eager, _unwrapping


def _uniform(seed: int, step: int) -> float:
    """A number in [0, 1) from (seed, step) alone (splitmix64): RST's coin, the same on every run
    and after a checkpoint."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return (x >> 11) / float(2**53)


def _check_phase(phase):
    """``phase`` as FusedSAM keeps it: None, a callable, or a (start, stop) tuple of step counts."""
    if phase is None or callable(phase):
        return phase
    if isinstance(phase, (tuple, list)) and len(phase) == 2:
        start, stop = phase
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start,) + (() if stop is None else (stop,)))
        if ints and start >= 0 and (stop is None or stop > start):
            return (start, stop)
    raise ValueError(f"phase must be (start, stop) with 0 <= start < stop (stop may be None: to the end), or a "
                     f"function of the step count, got {phase!r}")


def _probe(p: Tensor) -> tuple:
    """What tells later whether ``p.grad`` was added to in place: weak references to the parameter
    and its gradient, and the gradient's version counter now."""
    return weakref.ref(p), weakref.ref(p.grad), p.grad._version


def _added_to_once(probe: tuple | None) -> bool:
    """The probed gradient is still the parameter's, changed in place exactly once since: one
    backward accumulated into it (a ``zero_grad()`` and then a backward change it twice;
    ``set_to_none`` makes a new one)."""
    if probe is None:
        return False
    p, g = probe[0](), probe[1]()
    return p is not None and g is not None and p.grad is g and g._version == probe[2] + 1


class FusedSAM(SAMOptimizer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any base optimizer.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. A group may set its
            own ``rho``, ``adaptive``, ``eta`` and any base-optimizer hyperparameter.
        base_optimizer: the optimizer *class* that makes the update, e.g. ``torch.optim.SGD``.
        rho: radius of the neighbourhood (>= 0): ``||e|| = rho`` (ASAM: ``rho`` in the ``T``-scaled
            space, ``||e|| = rho * ||T^2 g|| / ||T g||``). The first step that perturbs measures
            ``||e|| / ||w||`` over the parameters it moves (``perturbation_fraction``, one host read,
            never again) and warns once (``LargePerturbationWarning``) above 0.1
            (``sam_fused.optim.base.LARGE_PERTURBATION``): the gradient is then taken that far from
            ``w``, and a small model may stop training.
        adaptive: ASAM (Kwon et al., 2021): the ball is scaled per weight by ``T = |w| + eta``.
        eta: ASAM's offset (>= 0); ``0`` reproduces the common implementation.
        backend: ``"torch"`` (reference, any device), ``"triton"`` (multi-tensor Triton kernels; CUDA,
            or the CPU under ``TRITON_INTERPRET=1``), ``"cuda"`` / ``"cpu"`` (native C++ kernels from
            ``csrc/``), or ``None``: Triton on CUDA, the native kernels on the CPU when they build,
            else the reference.
        interval: SAM on every ``interval``-th ``step(closure)`` (steps 0, k, 2k, ...), a plain
            base-optimizer step (one forward/backward) on the others. None: SAM on every step.
        sam_probability: randomized SAM (RST, Zhao et al. 2022): each ``step(closure)`` is a SAM
            step with this probability, decided from ``(seed, step)`` alone, so a run is
            reproducible and a resumed checkpoint makes the same choices. Not with ``interval``.
        seed: the seed of those choices.
        phase: SAM phases: SAM only on the steps of a window, plain base-optimizer steps (one
            forward/backward) outside it: ``(start, stop)`` for steps ``start <= step < stop``
            (``stop=None``: to the end; "SAM for the last 25% of training" is ``(0.75 * total,
            None)`` in steps), or a function of the step count returning whether SAM is on. Inside
            the window ``interval`` / ``sam_probability`` still apply. Counted in ``"sam_step"``
            like them.
        precondition: the preconditioned perturbation (Singh et al., ICML 2025, arXiv 2502.02407):
            ``e = rho * P^-1 g / ||P^-1 g||``, ``P = sqrt(v / (1 - beta2^t)) + eps`` from the
            Adam/AdamW base's ``exp_avg_sq`` after its last update (the identity for a parameter
            without one yet: the first step is SAM's). Adam and AdamW bases only; not with
            ``adaptive``. Fused on the Triton, ``cpu`` and ``cuda`` backends (the norm and perturb
            passes read ``exp_avg_sq``); see ``docs/language-models.md``.
        **base_kwargs: handed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    ``interval``, ``sam_probability`` and ``phase`` act in every form of the step:
    ``step(closure)``, ``step()`` after a backward, and ``first_step`` / ``second_step`` by hand
    (``sam_due()`` tells a hand-written loop whether the coming step is a SAM step; ``first_step``
    makes a plain step itself when it is not). Every step made is counted as ``"sam_step"`` in
    every param group, so the count is in ``state_dict()``; a step counts once it is made, so a
    refused step, a closure that raises or a step the GradScaler skips leaves the schedule as it
    was (the retry is the step that was due). Without a schedule nothing waits for the GradScaler's
    verdict: its skips are tallied on the device and taken off ``"sam_step"`` at ``state_dict()``
    (and at a copy or pickle), so the live count in ``param_groups`` includes them until then; with
    a schedule the count is exact after every step (one host read of found_inf).

    A param group with ``perturb=False`` is left where it is and out of the norm (SAM-ON, Mueller
    et al. 2023, perturbs only the normalization layers, with the norm over those alone:
    :func:`sam_fused.nn.norm_layer_param_groups`); its parameters are updated as usual with the
    gradient at the perturbed point of the others. The perturb and restore passes then read and
    write only the perturbed parameters' bytes (the backups are still allocated for every
    parameter with a gradient: the update pass reads from them when nothing is left out).

    ``param_groups`` is the base optimizer's own list, so LR schedulers, ``add_param_group`` and
    per-group hyperparameters work on this object directly. ``grad_norm`` holds, after each
    ``first_step``, the global gradient norm as a device tensor (no host synchronization); when it
    is not finite the perturbation is skipped and the weights are left untouched.

    Example::

        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        backend: str | None = None,
        interval: int | None = None,
        sam_probability: float | None = None,
        seed: int = 0,
        phase: "tuple[int, int | None] | Callable[[int], bool] | None" = None,
        precondition: bool = False,
        **base_kwargs,
    ) -> None:
        _check_nonneg("rho", rho)
        if not isinstance(precondition, bool):
            raise TypeError(f"precondition must be True or False, got {precondition!r}")
        if precondition:
            if not self._preconditions:
                raise ValueError(f"{type(self).__name__} has no preconditioned perturbation (FusedSAM and FunctionalSAM do)")
            if base_optimizer not in (torch.optim.Adam, torch.optim.AdamW):
                raise ValueError(
                    "precondition=True preconditions the perturbation by Adam's second moment: the base optimizer must "
                    f"be torch.optim.Adam or torch.optim.AdamW, got {getattr(base_optimizer, '__name__', base_optimizer)!r}")
            if adaptive:
                raise ValueError("precondition=True and adaptive=True exclude each other (two different metrics)")
        _check_nonneg("eta", eta)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or None")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval must be a positive integer or None, got {interval!r}")
        if sam_probability is not None:
            if interval is not None:
                raise ValueError("interval and sam_probability exclude each other")
            if isinstance(sam_probability, bool) or not isinstance(sam_probability, (int, float)) or not (
                    0.0 < sam_probability <= 1.0):
                raise ValueError(f"sam_probability must be in (0, 1], got {sam_probability!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.phase = _check_phase(phase)
        self.precondition = precondition
        self.interval, self.sam_probability, self.seed = interval, sam_probability, seed
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta, perturb=True, **self._variant_defaults)
        super().__init__(params, base_optimizer, defaults, backend, base_kwargs)
        self._grad_norm: Tensor | None = None
        self._inv_scale: Tensor | None = None
        # after first_step(grad_scaler=): (scaler, found_inf of the first pass or None, scaler enabled)
        self._amp_first: tuple | None = None
        self._watch = BackwardWatch()

    # GradScaler.step(opt) hands this optimizer ``grad_scale`` and ``found_inf`` attributes and calls
    # step(): the update unscales in its kernels (see step()).
    _step_supports_amp_scaling = True

    _group_keys = ("rho", "adaptive", "eta", "perturb")

    @property
    def grad_norm(self) -> Tensor | None:
        """The global gradient norm of the last ``first_step`` (unscaled with AMP), a device tensor."""
        inner = self.__dict__.get("_optimizer")
        return (inner if isinstance(inner, FusedSAM) else self)._grad_norm

    def _end_step(self) -> None:
        self._amp_first = None
        self._watch.clear()

    def _check_group(self, group: dict) -> None:
        _check_nonneg("rho", group["rho"])
        _check_nonneg("eta", group["eta"])
        if not isinstance(group["perturb"], bool):
            raise TypeError(f"a param group's perturb must be True or False, got {group['perturb']!r}")
        if not group["perturb"] and not self._subsets:
            raise ValueError(f"{type(self).__name__} perturbs every group (perturb=False is FusedSAM's, SAM and "
                             "ASAM): its gradient combination needs both gradients of every parameter")
        if self.__dict__.get("precondition"):
            if group.get("amsgrad", False):
                raise ValueError("precondition=True reads Adam's exp_avg_sq: amsgrad (which divides by its running "
                                 "maximum instead) is not supported")
            if group["adaptive"]:
                raise ValueError("precondition=True and adaptive=True exclude each other (two different metrics)")

    # Whether param groups may be left unperturbed (perturb=False); the gradient combinations of
    # GSAM and LookSAM are defined over every parameter.
    _subsets = True
    # Whether precondition=True is offered; GSAM and LookSAM combine the two gradients in the
    # gradient's own metric, so they refuse it.
    _preconditions = True

    # Buffers the first step fills with the (unscaled) first gradient in its perturb pass (GSAM,
    # LookSAM). None: nothing is saved.
    _save: Buffers | None = None
    # Per-group hyperparameters a variant adds to rho, adaptive and eta (set before __init__).
    _variant_defaults: dict = {}

    def _combination(self, plan: StepPlan, amp) -> "Combo | None":
        """A fused gradient combination (GSAM, LookSAM) for this second step's update: a
        :class:`~sam_fused.backends.base.Combo`, or None (FusedSAM: the gradients as they are).
        ``amp`` = (inv_scale, found_inf) or None."""
        return None

    # ------------------------------------------------------------------ SAM
    @_unwrapping
    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
        """Move every parameter with a grad to ``w + e(w)``, keeping an exact backup of ``w``.

        ``grad_scaler``: the ``torch.amp.GradScaler`` that scaled this backward's loss. The kernels
        then read the scaled gradients and unscale them as they go; an inf or NaN among them skips
        the perturbation, and the following ``scaler.step(opt)`` (the second step) skips the update
        and reports the inf to ``scaler.update()``, which lowers the scale.

        With a schedule (``interval``, ``sam_probability``, LookSAM's ``k``), on a step the schedule
        makes plain (``sam_due()`` is False) it makes that plain step with these gradients, and the
        ``second_step()`` that follows does nothing but its ``zero_grad``: a hand-written loop keeps
        its shape, and one that asks ``opt.sam_due()`` first saves the second forward/backward
        (said once). Under a GradScaler a plain step is refused here: make it with one backward and
        ``scaler.step(opt)``.

        Raises, with nothing written, on a bad gradient or hyperparameter, or when the parameters
        are already perturbed (call ``second_step()`` or ``restore()`` first)."""
        if self._perturbed is not None or self.__dict__.get("_plain_done"):
            raise RuntimeError(
                "first_step() called twice: the parameters are already perturbed (or this step's plain update was "
                "made); call second_step() to end the step, or restore() to undo the perturbation"
            )
        self._check_left_by_second_step()
        if self._schedules() and not self.sam_due():
            self._first_step_plain(zero_grad, grad_scaler)
            return
        plan = self._step_plan(perturbing=True)
        if not plan.active and not self.__dict__.get("_warned_no_grad", False):
            self._warned_no_grad = True
            warnings.warn(
                f"{type(self).__name__}.first_step() found no gradient on any parameter: nothing is perturbed and "
                "the second step is a plain base-optimizer step. Was zero_grad() called between backward() and "
                "first_step()? (said once)", stacklevel=3)
        inv_scale = self._first_inv_scale(grad_scaler, plan) if grad_scaler is not None else None
        try:
            norm = None
            if plan.active:
                reduce_sq = self._backend.plans.params.reduce_sq
                if self.precondition:  # the Adam base's state holds the preconditioner
                    norm = self._backend.perturb(plan, reduce_sq, inv_scale, precondition=self.base_optimizer.state)
                else:
                    extra = {} if self._save is None else {"save": self._save}
                    norm = self._backend.perturb(plan, reduce_sq, inv_scale, **extra)
            self._grad_norm = norm
        finally:
            self._backend.plans.end_pass()
        self._perturbed = plan
        if not zero_grad and plan.active:  # a second backward that adds to these is warned of in second_step
            self._grad_probe = _probe(plan.active[0])
        if self._perturbation_checks > 0 and norm is not None and not _capturing():
            self._measure_perturbation(plan)
        if grad_scaler is not None:
            found = None
            if inv_scale is not None and norm is not None:  # the norm is finite iff every gradient is
                found = torch.logical_not(torch.isfinite(norm)).to(torch.float32).reshape(1)
            self._amp_first = (grad_scaler, found, inv_scale is not None)
        if zero_grad:
            self.zero_grad()

    def _check_accumulated(self) -> None:
        """Warn (once) when the second backward added to the first gradient: first_step() without
        zero_grad=True and no zero_grad() before the second backward (the gradient is the same
        tensor, changed in place exactly once: an accumulation; a zero_grad() then a backward
        changes it twice, set_to_none makes a new one)."""
        probe = self.__dict__.pop("_grad_probe", None)
        if not self.__dict__.get("_warned_accumulated", False) and _added_to_once(probe):
            self._warned_accumulated = True
            warnings.warn(
                f"{type(self).__name__}: the second backward added its gradient to the first one (first_step() without "
                "zero_grad=True, and no zero_grad() before the second backward), so this update uses g(w) + g(w + e). "
                "Call first_step(zero_grad=True) (said once)", stacklevel=4)

    def _check_left_by_second_step(self) -> None:
        """Warn (once) when this first gradient was added to the one a hand-called second_step()
        without zero_grad=True left (taken at w + e): no zero_grad() before this backward."""
        probe = self.__dict__.pop("_second_left_probe", None)
        if not self.__dict__.get("_warned_second_left", False) and _added_to_once(probe):
            self._warned_second_left = True
            warnings.warn(
                f"{type(self).__name__}: this first gradient was added to the one the last second_step() left (taken "
                "at w + e: second_step() without zero_grad=True, and no zero_grad() before this backward), so the "
                "perturbation follows g(w) + g(w + e) of the last step. Call second_step(zero_grad=True) or "
                "opt.zero_grad() before the backward (said once)", stacklevel=4)

    def _leave_second_probe(self, zero_grad: bool) -> None:
        """After a second_step() that leaves the gradients: remember one, for the next first_step."""
        if zero_grad or self.__dict__.get("_warned_second_left", False):
            return
        p = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if p is not None:
            self._second_left_probe = _probe(p)

    def sam_due(self) -> bool:
        """Whether the next step is a SAM step of the schedule (``interval``, ``sam_probability``,
        LookSAM's ``k``); always True without one. A loop that runs its own passes asks it before
        the first: ``if opt.sam_due(): first_step / second backward / second_step, else opt.step()``."""
        return self.is_sam_step(self.param_groups[0].get("sam_step", 0))

    def _first_step_plain(self, zero_grad: bool, grad_scaler) -> None:
        """``first_step()`` on a step the schedule makes plain: that plain step, now."""
        step = self.param_groups[0].get("sam_step", 0)
        if grad_scaler is not None:
            raise RuntimeError(
                f"step {step} is a plain step of the schedule: under a GradScaler make it with one backward and "
                "scaler.step(opt) (ask opt.sam_due() before first_step(); the weights are untouched)")
        self._check_groups()
        self._plain_step()
        self._end_step()
        self._count_step()
        self._opt_called = True
        self._plain_done = True
        if not self.__dict__.get("_warned_plain", False):
            self._warned_plain = True
            warnings.warn(
                f"{type(self).__name__}: step {step} is a plain step of the schedule; first_step() made it with these "
                "gradients, and the second forward/backward and second_step() have nothing to do. Ask opt.sam_due() "
                "before the first pass to skip them (said once)", stacklevel=4)
        if zero_grad:
            self.zero_grad()
    def _measure_perturbation(self, plan: StepPlan) -> None:
        """At the first step that perturbs: ``||e||`` as moved, ``||w + e - backup||`` over the
        parameters of the plan, against ``||w||`` (their backups), then
        :meth:`_note_perturbation` (one host read; nothing after the first step). For SAM
        ``||e||`` is rho (each group's rho times its share of the gradient norm); for ASAM it is
        ``rho * ||T^2 g|| / ||T g||``, so up to rho times the largest ``|w| + eta``; for GSAM and
        LookSAM it is SAM's."""
        device = plan.locals[0].device
        e_sq = torch.zeros((), dtype=torch.float64, device=device)
        w_sq = torch.zeros((), dtype=torch.float64, device=device)
        backups = self._backend.backups
        for p, t in zip(plan.active, plan.locals):
            b = backups.get(p)
            w_sq += torch.linalg.vector_norm(b, dtype=torch.float64) ** 2
            e_sq += torch.linalg.vector_norm(t.detach() - b, dtype=torch.float64) ** 2
        adaptive = any(g["adaptive"] for g in self.param_groups)
        rhos = sorted({float(g["rho"]) for g in self.param_groups})
        rho = "rho " + "/".join(f"{r:g}" for r in rhos)
        what = (f"ASAM, {rho}: ||e|| as measured, rho * ||T^2 g|| / ||T g||" if adaptive
                else f"{rho}: ||e|| = rho")
        self._note_perturbation(e_sq, w_sq, what)

    def _first_inv_scale(self, scaler, plan: StepPlan) -> Tensor | None:
        """1 / scale of an enabled GradScaler, on the parameters' device (None when it is disabled);
        refuses, before anything is written, a scaler in a state the SAM step cannot follow."""
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if not scaler.is_enabled():
            return None
        if self._backend.plans.params.dtensor:
            raise NotImplementedError(
                "a GradScaler with FSDP2 (DTensor) parameters is not supported: use bf16 mixed precision "
                "(fully_shard's MixedPrecisionPolicy), which needs no scaler"
            )
        stage = scaler._per_optimizer_states[id(self)]["stage"]
        if stage is OptState.UNSCALED:
            raise RuntimeError(
                "scaler.unscale_(opt) was called before first_step(grad_scaler=scaler): the first gradients must "
                "stay scaled (first_step unscales them itself). To clip, clip the second gradient: "
                "scaler.unscale_(opt) after the second backward, then scaler.step(opt)"
            )
        if stage is OptState.STEPPED:
            raise RuntimeError("scaler.step(opt) ran since the last scaler.update(): call scaler.update() first")
        scale = scaler._scale
        if scale is None:
            raise RuntimeError("the GradScaler has not scaled a loss yet: scaler.scale(loss).backward() comes first")
        device = plan.active[0].device if plan.active else scale.device
        if scale.device != device:
            raise ValueError(f"the GradScaler's scale is on {scale.device}, the parameters on {device}")
        if self._inv_scale is None or self._inv_scale.device != device:
            self._inv_scale = torch.empty(1, dtype=torch.float32, device=device)
        return torch.reciprocal(scale.reshape(1).float(), out=self._inv_scale)

    @_unwrapping
    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
        """Restore ``w`` bit-identically, then apply the base optimizer with the current grads.

        ``grad_scale`` / ``found_inf``: one-element fp32 tensors on the parameters' device, as
        torch's fused optimizers take them (mixed precision): the gradients are divided by
        grad_scale inside the update, and a non-zero found_inf leaves the weights restored and the
        state untouched. Raises, with nothing written, on bad gradients or optimizer state; the
        parameters then stay perturbed until ``restore()`` or a successful ``second_step()``.
        """
        if self.__dict__.pop("_plain_done", False):  # first_step() made this step's plain update
            if zero_grad:
                self.zero_grad()
            self._leave_second_probe(zero_grad)
            return
        if self._perturbed is None:
            raise RuntimeError("second_step() called without a preceding first_step()")
        self._check_accumulated()
        if (grad_scale is None) != (found_inf is None):
            raise ValueError("grad_scale and found_inf go together")
        if grad_scale is None and self._amp_first is not None and self._amp_first[2]:
            raise RuntimeError(
                "after first_step(grad_scaler=scaler), the second step is scaler.step(opt) (the gradients are "
                "scaled); the parameters stay perturbed until then or restore()"
            )
        self._check_unmoved(self._perturbed)
        plan = self._step_plan()  # refuses bad gradients before anything is restored
        try:
            amp = None
            if grad_scale is not None:
                check_amp(plan, (grad_scale, found_inf))
                if self._inv_scale is None or self._inv_scale.device != grad_scale.device:
                    self._inv_scale = torch.empty(1, dtype=torch.float32, device=grad_scale.device)
                torch.reciprocal(grad_scale.reshape(1), out=self._inv_scale)
                amp = (self._inv_scale, found_inf.reshape(1))
                if self._amp_first is not None and self._amp_first[1] is not None:
                    amp = (amp[0], amp[1] + self._amp_first[1])  # an inf in either pass skips the update
            combo = self._combination(plan, amp)
            if combo is None:
                self._backend.restore_and_update(self._perturbed, plan, amp)
            else:
                self._backend.restore_and_update(self._perturbed, plan, amp, combo)
        finally:
            self._backend.plans.end_pass()
        self._perturbed = None
        self._end_step()
        # the schedule counts every step made, by hand or through step(); one the GradScaler skips
        # (an inf in either backward) leaves it as it was. With a schedule the host decides the next
        # step from the count: one host read of found_inf. Without one nothing waits for it: the
        # skip is tallied on the device and taken off the count at state_dict() (_settle_count)
        if amp is None:
            self._count_step()
        elif self._schedules():
            if not float(amp[1].sum()):
                self._count_step()
        else:
            self._count_step()
            skipped = (amp[1].sum() != 0).to(torch.int64)
            self._skipped = skipped if self.__dict__.get("_skipped") is None else self._skipped + skipped
        self._opt_called = True  # tells LR schedulers that the optimizer has stepped
        if zero_grad:
            self.zero_grad()
        self._leave_second_probe(zero_grad)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SAM step through a closure, or the second step under ``GradScaler.step(opt)``.

        ``closure`` runs forward + backward and returns the loss. Both conventions work:

        * torch / Lightning / accelerate: nothing ran before ``step(closure)``; the closure is called
          twice (at ``w``, then at ``w + e``) and the loss of the first call is returned.
        * davda54 / pytorch_optimizer: ``loss.backward()`` ran before ``step(closure)``; those
          gradients make the perturbation, the closure is called once (at ``w + e``) and None is
          returned (the loss at ``w`` is the one already computed).

        Which one is told by the gradients, not guessed: a hook on each parameter (registered on the
        first ``step(closure)``) records whether a backward wrote a gradient since the last SAM step;
        on that first call, before any hook can have fired, a gradient present counts as one.
        If the closure (or the update) raises after the perturbation, the weights are restored
        exactly before the exception propagates.

        Without a closure, between ``first_step()`` and ``second_step()``, it is the second step (what a
        training loop that calls ``optimizer.step()`` itself needs, as Hugging Face's Trainer in
        ``SAMTrainer``); with a schedule (interval, randomized SAM, LookSAM) on a step the schedule
        makes plain, it is that plain step with the gradients of the backward that ran. Both count
        in ``"sam_step"``, as ``step(closure)`` does. Called by ``scaler.step(opt)`` (``torch.amp.GradScaler``) after
        ``first_step(grad_scaler=scaler)`` and the second backward, it is the second step: the gradients are unscaled in the update
        kernels, and an inf or NaN in either backward skips the update.
        """
        self.__dict__["_in_step"] = True  # second_step() inside runs no step hooks: torch.optim's wrapper ran them
        try:
            return self._step(closure)
        finally:
            self.__dict__["_in_step"] = False

    def _step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        if hasattr(self, "found_inf"):  # set by GradScaler.step around this call
            return self._scaler_second_step(closure)
        if closure is None:
            if self._perturbed is not None or self.__dict__.get("_plain_done"):
                self.second_step()  # between first_step() and second_step(): the second step
                return None
            if self._schedules() and not self.is_sam_step(self.param_groups[0].get("sam_step", 0)):
                # a step the schedule makes plain, in a loop that runs its own backward (SAMTrainer)
                self._check_groups()
                self._plain_step()
                self._end_step()
                self._count_step()
                self._opt_called = True
                return None
            if _called_by_dcp_state_init():
                # torch.distributed.checkpoint creates the state of a fresh optimizer it loads into by a
                # step with zero gradients and lr = 0: the base optimizer's own step does exactly that
                unhooked_step(self.base_optimizer)
                return None
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward and returns the loss; "
                "or call first_step() and second_step() yourself (step() between them is the second step); with a "
                "GradScaler: first_step(grad_scaler=scaler), then scaler.step(opt) after the second backward. With "
                "Hugging Face's Trainer, use sam_fused.integrations.transformers.SAMTrainer, which runs both passes"
            )
        closure = torch.enable_grad()(closure)
        self._check_groups()  # a refused step changes nothing, the schedule included
        loss = None
        ran = self._watch.backward_ran(self)
        left = self.__dict__.pop("_left_probe", None)
        self.__dict__.pop("_second_left_probe", None)  # step(closure) checks what it left itself (left)
        step = self.param_groups[0].get("sam_step", 0)
        if not self.is_sam_step(step):  # a plain base-optimizer step: one forward/backward
            loss = None if ran else closure()
            self._plain_step()
            self._end_step()
        else:
            if not ran:
                loss = closure()
                self._check_closure_backward(left)
            self.first_step(zero_grad=True)
            try:
                with self._frozen_stats():  # the forward at w + e (freeze_running_stats)
                    closure()
                self.second_step()  # counts the step once it is made
            except BaseException:
                self.restore()
                raise
            self._leave_probe()
            return loss
        # counted only once the step is made: a refused or failed step (a closure that raised, say
        # out of memory) leaves the schedule as it was, so the retry is the step that was due
        self._count_step()
        self._opt_called = True
        self._leave_probe()
        return loss

    def _leave_probe(self) -> None:
        """Remember one gradient this step leaves behind (the next closure must clear it)."""
        p = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if p is not None and not self.__dict__.get("_warned_left", False):
            self._left_probe = _probe(p)

    def _check_closure_backward(self, left) -> None:
        """Warn (once each) when the closure ran no backward that reached a parameter, or when its
        backward added to the gradient the last step left (the same tensor, changed in place
        exactly once: no zero_grad() before the backward)."""
        if not self.__dict__.get("_warned_left", False) and _added_to_once(left):
            self._warned_left = True
            warnings.warn(
                f"{type(self).__name__}.step(closure): the closure's backward added to the gradient the last step "
                "left (taken at w + e), so this step's first gradient is the sum of both. Call opt.zero_grad() at "
                "the start of the closure (said once)", stacklevel=4)
        if self._watch.flag.seen or self.__dict__.get("_warned_no_backward", False):
            return
        self._warned_no_backward = True
        self._warned_no_grad = True  # first_step's hint (zero_grad between backward and first_step) does not fit
        warnings.warn(
            f"{type(self).__name__}.step(closure): the closure ran no backward() that reached a parameter, so nothing "
            "is trained. The closure must compute the loss, call loss.backward() and return the loss (said once)",
            stacklevel=4)

    def _schedules(self) -> bool:
        """Whether some steps are plain (interval or randomized SAM, LookSAM, phases)."""
        return self.interval is not None or self.sam_probability is not None or self.phase is not None

    def _count_step(self) -> None:
        step = self.param_groups[0].get("sam_step", 0)
        for group in self.param_groups:
            group["sam_step"] = step + 1

    def _settle_count(self) -> None:
        """Take the GradScaler-skipped steps tallied on the device off ``"sam_step"`` (one host read,
        at checkpoint time; see second_step)."""
        skipped = self.__dict__.pop("_skipped", None)
        if skipped is not None and int(skipped):
            for group in self.param_groups:
                group["sam_step"] = group.get("sam_step", 0) - int(skipped)

    def state_dict(self) -> dict:
        """The base optimizer's state dict (see :meth:`SAMOptimizer.state_dict`), with ``"sam_step"``
        up to date: under a GradScaler without a schedule, the steps it skipped are taken off the
        count here, so that no step waits for the device to tell."""
        self._settle_count()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.pop("_skipped", None)
        super().load_state_dict(state_dict)

    def _plain_step(self) -> None:
        """The update of a step that is not a SAM step (interval or randomized SAM, LookSAM's steps
        in between): the base optimizer's own step with the gradients as they are."""
        unhooked_step(self.base_optimizer)

    def is_sam_step(self, step: int) -> bool:
        """Whether ``step(closure)`` number ``step`` (counted from 0) is a SAM step."""
        if self.phase is not None:
            if callable(self.phase):
                if not self.phase(step):
                    return False
            elif not (self.phase[0] <= step and (self.phase[1] is None or step < self.phase[1])):
                return False
        if self.interval is not None:
            return step % self.interval == 0
        if self.sam_probability is not None:
            return _uniform(self.seed, step) < self.sam_probability
        return True

    @_eager
    @torch.no_grad()
    def _scaler_plain_step(self) -> None:
        """``scaler.step(opt)`` on a step the schedule makes plain: the base update on the unscaled
        gradients of the one backward, skipped (and not counted) when they hold an inf or NaN."""
        grad_scale, found_inf = passed_by_scaler(self)
        plan = self._step_plan()
        try:
            check_amp(plan, (grad_scale, found_inf))
            self._backend.restore_and_update(None, plan, (torch.reciprocal(grad_scale), found_inf))
        finally:
            self._backend.plans.end_pass()
        self._end_step()
        if not float(found_inf.sum()):
            self._count_step()
        self._opt_called = True

    def _scaler_second_step(self, closure) -> None:
        """``scaler.step(opt)``: the second step with the scaler's ``grad_scale`` (None when the
        user unscaled the second gradients already, to clip them) and ``found_inf``."""
        try:
            if closure is not None:
                raise RuntimeError(
                    "scaler.step(opt, closure) is not supported: with a GradScaler, run the passes yourself: "
                    "first_step(grad_scaler=scaler) after the first backward, scaler.step(opt) after the second"
                )
            if self._perturbed is None:
                if self._schedules() and not self.sam_due():  # a plain step of the schedule, one backward
                    self._scaler_plain_step()
                    return None
                raise RuntimeError("scaler.step(opt) is the second step: call opt.first_step(grad_scaler=scaler) first")
            if self._amp_first is None:
                self.restore()
                raise RuntimeError(
                    "scaler.step(opt) after a first_step() without grad_scaler=: the first gradients were read "
                    "scaled and unchecked; the weights were restored and no update was made. Pass "
                    "first_step(grad_scaler=scaler)"
                )
            scaler, found_first, _ = self._amp_first
            grad_scale, found_inf = passed_by_scaler(self)
            tracked = None
            if found_first is not None:  # scaler.update() must see the first pass's inf too
                tracked = scaler._per_optimizer_states[id(self)]["found_inf_per_device"].get(found_first.device)
                if tracked is None:
                    raise RuntimeError("the GradScaler checked no gradient on the parameters' device")
            self.second_step(grad_scale=grad_scale, found_inf=found_inf)  # counts the step unless skipped
            if tracked is not None:
                tracked.add_(found_first.reshape(tracked.shape))
        except BaseException:
            # GradScaler.step removes these only when step() returns
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return None
