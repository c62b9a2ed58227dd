"""``FusedSAM``: Sharpness-Aware Minimization as a drop-in ``torch.optim`` optimizer (SAM, ASAM,
interval and randomized SAM)."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from ..backends import BACKENDS
from ..backends.base import Combo, check_amp, unhooked_step
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
        **base_kwargs: handed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    ``interval`` and ``sam_probability`` act through ``step()`` only: ``step(closure)``, or
    ``step()`` after a backward in a loop that runs its own (``first_step`` / ``second_step``
    called by hand are a SAM step by definition); the count of steps made by ``step()`` is kept as
    ``"sam_step"`` in every param group, so it is in ``state_dict()``; a call counts once its step
    is made, so a refused step or a closure that raises leaves the schedule
    as it was (the retry is the step that was due).

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
        **base_kwargs,
    ) -> None:
        _check_nonneg("rho", rho)
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
        self.interval, self.sam_probability, self.seed = interval, sam_probability, seed
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta, **self._variant_defaults)
        super().__init__(params, base_optimizer, defaults, backend, base_kwargs)
        self._grad_norm: Tensor | None = None
        self._inv_scale: Tensor | None = None
        # after first_step(grad_scaler=): (scaler, found_inf of the first pass or None, scaler enabled)
        self._amp_first: tuple | None = None
        self._watch = BackwardWatch()

    # GradScaler.step(opt) hands this optimizer ``grad_scale`` and ``found_inf`` attributes and calls
    # step(): the update unscales in its kernels (see step()).
    _step_supports_amp_scaling = True

    _group_keys = ("rho", "adaptive", "eta")

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

    # A function called with the sum of squares of the (ASAM-weighted) gradients, a 0-dim fp64
    # device tensor, before its square root becomes the norm; it may change it in place (a
    # distributed all-reduce goes here). None: no call.
    _reduce_sq: Callable[[Tensor], None] | None = None
    # A SAM variant's own perturbation direction: parameter-sized buffers (plan.Buffers) the
    # first step perturbs along, in place of the gradients. None: the gradients.
    _direction: Buffers | None = None
    # Buffers the first step fills with the (unscaled) first gradient in its perturb pass (GSAM,
    # LookSAM). None: nothing is saved.
    _save: Buffers | None = None
    # Per-group hyperparameters a variant adds to rho, adaptive and eta (set before __init__).
    _variant_defaults: dict = {}

    def _sq_reduction(self) -> Callable[[Tensor], None] | None:
        """What turns the local sum of squares into the global one: the all-reduce over the shards
        of FSDP2 (DTensor) parameters, then ``_reduce_sq``."""
        sharded = self._backend.plans.params.reduce_sq
        extra = self._reduce_sq
        if sharded is None or extra is None:
            return sharded or extra

        def both(sq: Tensor) -> None:
            sharded(sq)
            extra(sq)

        return both

    def _combine(self, plan: StepPlan) -> None:
        """A SAM variant's gradient combination: called by ``second_step`` after the gradients were
        checked and before the update, with the step's plan (its buckets list the parameters as
        the kernels see them); may rewrite ``p.grad`` in place. FusedSAM's does nothing."""

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

        Raises, with nothing written, on a bad gradient or hyperparameter, or when the parameters
        are already perturbed (call ``second_step()`` or ``restore()`` first)."""
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: the parameters are already perturbed; call second_step() to "
                "update them, or restore() to undo the perturbation"
            )
        plan = self._step_plan()
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
                extra = {} if self._save is None else {"save": self._save}
                norm = self._backend.perturb(plan, self._sq_reduction(), self._direction, inv_scale, **extra)
            self._grad_norm = norm
        finally:
            self._backend.plans.end_pass()
        self._perturbed = plan
        if self._perturbation_checks > 0 and norm is not None and not _capturing():
            self._measure_perturbation(plan)
        if grad_scaler is not None:
            found = None
            if inv_scale is not None and norm is not None:  # the norm is finite iff every gradient is
                found = torch.logical_not(torch.isfinite(norm)).to(torch.float32).reshape(1)
            self._amp_first = (grad_scaler, found, inv_scale is not None)
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
        if self._perturbed is None:
            raise RuntimeError("second_step() called without a preceding first_step()")
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
            self._combine(plan)
            combo = self._combination(plan, amp)
            if combo is None:
                self._backend.restore_and_update(self._perturbed, plan, amp)
            else:
                self._backend.restore_and_update(self._perturbed, plan, amp, combo)
        finally:
            self._backend.plans.end_pass()
        self._perturbed = None
        self._end_step()
        self._opt_called = True  # tells LR schedulers that the optimizer has stepped
        if zero_grad:
            self.zero_grad()

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
            if self._perturbed is not None:  # between first_step() and second_step(): the second step
                self.second_step()
                self._count_step()
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
        step = self.param_groups[0].get("sam_step", 0)
        if not self.is_sam_step(step):  # a plain base-optimizer step: one forward/backward
            loss = None if ran else closure()
            self._plain_step()
            self._end_step()
        else:
            if not ran:
                loss = closure()
            self.first_step(zero_grad=True)
            try:
                closure()
                self.second_step()
            except BaseException:
                self.restore()
                raise
        # counted only once the step is made: a refused or failed step (a closure that raised, say
        # out of memory) leaves the schedule as it was, so the retry is the step that was due
        self._count_step()
        self._opt_called = True
        return loss

    def _schedules(self) -> bool:
        """Whether some steps are plain (interval or randomized SAM, LookSAM)."""
        return self.interval is not None or self.sam_probability is not None

    def _count_step(self) -> None:
        step = self.param_groups[0].get("sam_step", 0)
        for group in self.param_groups:
            group["sam_step"] = step + 1

    def _plain_step(self) -> None:
        """The update of a step that is not a SAM step (interval or randomized SAM, LookSAM's steps
        in between): the base optimizer's own step with the gradients as they are."""
        unhooked_step(self.base_optimizer)

    def is_sam_step(self, step: int) -> bool:
        """Whether ``step(closure)`` number ``step`` (counted from 0) is a SAM step."""
        if self.interval is not None:
            return step % self.interval == 0
        if self.sam_probability is not None:
            return _uniform(self.seed, step) < self.sam_probability
        return True

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
                raise RuntimeError("scaler.step(opt) is the second step: call opt.first_step(grad_scaler=scaler) first")
            if self._amp_first is None:
                self.restore()
                raise RuntimeError(
                    "scaler.step(opt) after a first_step() without grad_scaler=: the first gradients were read "
                    "scaled and unchecked; the weights were restored and no update was made. Pass "
                    "first_step(grad_scaler=scaler)"
                )
            scaler, found_first, _ = self._amp_first
            found_inf = self.found_inf.reshape(1).to(torch.float32)
            grad_scale = self.grad_scale
            if grad_scale is None:  # scaler.unscale_(opt) ran: the gradients are unscaled already
                grad_scale = torch.ones(1, dtype=torch.float32, device=found_inf.device)
            grad_scale = grad_scale.reshape(1).to(torch.float32)
            tracked = None
            if found_first is not None:  # scaler.update() must see the first pass's inf too
                tracked = scaler._per_optimizer_states[id(self)]["found_inf_per_device"].get(found_first.device)
                if tracked is None:
                    raise RuntimeError("the GradScaler checked no gradient on the parameters' device")
            self.second_step(grad_scale=grad_scale, found_inf=found_inf)
            # a step the scaler skips (an inf in either backward) leaves the schedule as it was: one
            # host read of found_inf per step, the price of a schedule counted on the host
            skipped = found_inf if found_first is None else found_inf + found_first.reshape(found_inf.shape)
            if not float(skipped.sum()):
                self._count_step()
            if tracked is not None:
                tracked.add_(found_first.reshape(tracked.shape))
        except BaseException:
            # GradScaler.step removes these only when step() returns
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return None
