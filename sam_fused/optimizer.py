"""``FusedSAM``: Sharpness-Aware Minimization as a drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor

from .backends import BACKENDS, make_backend
from .backends.base import FUSED_KINDS, check_amp
from .plan import Buffers, StepPlan

# Inside a function compiled with torch.compile, the steps run eagerly (a graph break): traced,
# the reference backend's backup copy was reordered after the perturbation (the weights were
# never restored) and the native and Triton launches cannot be traced at all.
_eager = torch.compiler.disable


def _check_nonneg(name: str, value) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < float("inf")
            or value > 1e30):
        raise ValueError(f"{name} must be a finite non-negative number (at most 1e30), got {value!r}")


class SAMOptimizer(torch.optim.Optimizer):
    """What every SAM-family optimizer here shares: the base optimizer built on the same param groups,
    its state dict, param groups with per-group SAM hyperparameters, validation, the backend (and
    through it the cached step plans), copying and pickling.

    Subclasses name their per-group keys in ``_group_keys``, check them in ``_check_group`` and
    name the backend factory in ``_backend_factory`` (a function of (name, optimizer)).
    """

    _group_keys: tuple[str, ...] = ()
    _backend_factory = staticmethod(make_backend)

    def __init__(self, params: Iterable, base_optimizer: type, defaults: dict, backend, base_kwargs: dict) -> None:
        if not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass (the class, not an instance), "
                f"got {base_optimizer!r}"
            )
        super().__init__(params, dict(defaults, **base_kwargs))
        for group in self.param_groups:
            self._check_group(group)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._backend = self._backend_factory(backend, self)
        self._backend.plans.bind(self.param_groups)
        self._perturbed: StepPlan | None = None

    @property
    def backend(self) -> str:
        """Name of the backend in use."""
        return self._backend.name

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _check_groups(self) -> None:
        """Per step: every group has valid SAM hyperparameters (a group added to the base optimizer
        directly gets the defaults)."""
        for group in self.param_groups:
            if any(k not in group for k in self._group_keys):
                for key in self._group_keys:
                    group.setdefault(key, self.defaults[key])
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during Optimizer.__init__, before the base optimizer exists
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        for key in self._group_keys:
            group.setdefault(key, self.defaults[key])
        self._check_group(group)
        base.add_param_group(group)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the cached step plans: call after changing parameters in a way the optimizer cannot
        see (it does see ``add_param_group``, ``load_state_dict``, new ``.grad`` tensors and
        parameters whose storage or size changed)."""
        self._backend.invalidate()

    def state_dict(self) -> dict:
        """The base optimizer's state dict; SAM's scratch buffers are never saved."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(): call restore() first")
        kind = FUSED_KINDS.get(type(self.base_optimizer))
        if kind is not None:  # torch.optim would fail half-way with a bare KeyError
            needed = {"sgd": (), "adam": ("step", "exp_avg", "exp_avg_sq")}[kind]
            allowed = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}[kind]
            for index, st in state_dict.get("state", {}).items():
                if st and (any(k not in st for k in needed) or not set(st) <= allowed):
                    raise ValueError(
                        f"this checkpoint's state of parameter {index} has {sorted(st)}, not the state of "
                        f"{type(self.base_optimizer).__name__}: was it saved by another optimizer?"
                    )
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key in self._group_keys:
                group.setdefault(key, self.defaults[key])
        self.invalidate()

    @_eager
    @torch.no_grad()
    def restore(self) -> bool:
        """Undo a perturbation: every perturbed parameter gets back its exact value from before
        ``first_step()``; the gradients and the optimizer state are left alone. Returns whether
        there was a perturbation to undo."""
        plan, self._perturbed = self._perturbed, None
        if plan is None:
            return False
        self._check_unmoved(plan)
        self._backend.restore(plan)
        return True

    @torch.no_grad()
    def _check_unmoved(self, plan: StepPlan) -> None:
        """The perturbed parameters still have their storage (the kernels would write the backups to
        the old addresses otherwise). If one was replaced (``p.data = ...``) between the two steps,
        the others are restored by plain copies, and a clear error is raised."""
        if plan.still_valid():
            return
        self._perturbed = None
        moved = 0
        for p, ptr, n in zip(plan.active, plan.ptrs, plan.numels):
            if p.data_ptr() == ptr and p.numel() == n:
                p.detach().copy_(self._backend.backups.get(p))
            else:
                moved += 1
        self.invalidate()
        raise RuntimeError(
            f"{moved} parameter(s) got new storage (p.data = ...) between first_step() and second_step(): their "
            "perturbation cannot be undone through them; the other parameters were restored and no update was made"
        )

    def _step_plan(self) -> StepPlan:
        """The cached plan of this step, after checking every grad and group (raises before any write)."""
        self._check_groups()
        return self._backend.plan()

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        if self._perturbed is not None:
            raise RuntimeError(
                f"a {type(self).__name__} between first_step() and second_step() cannot be copied or pickled: "
                "its parameters are perturbed and the backups are not part of it; call second_step() or restore()"
            )
        state = dict(self.__dict__)
        state["_backend"] = self._backend.name
        return state

    def __setstate__(self, state: dict) -> None:
        torch.optim.Optimizer.__setstate__(self, state)
        self._backend = self._backend_factory(state["_backend"], self)
        self._perturbed = None


class FusedSAM(SAMOptimizer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021) around any base optimizer.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. A group may set its
            own ``rho``, ``adaptive``, ``eta`` and any base-optimizer hyperparameter.
        base_optimizer: the optimizer *class* that makes the update, e.g. ``torch.optim.SGD``.
        rho: radius of the neighbourhood (>= 0).
        adaptive: ASAM (Kwon et al., 2021): the ball is scaled per weight by ``T = |w| + eta``.
        eta: ASAM's offset (>= 0); ``0`` reproduces the common implementation.
        backend: ``"torch"`` (reference, any device), ``"triton"`` (multi-tensor Triton kernels; CUDA,
            or the CPU under ``TRITON_INTERPRET=1``), ``"cuda"`` / ``"cpu"`` (native C++ kernels from
            ``csrc/``), or ``None``: Triton on CUDA, the native kernels on the CPU when they build,
            else the reference.
        **base_kwargs: handed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

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
        **base_kwargs,
    ) -> None:
        _check_nonneg("rho", rho)
        _check_nonneg("eta", eta)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or None")
        defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta)
        super().__init__(params, base_optimizer, defaults, backend, base_kwargs)
        self.grad_norm: Tensor | None = None
        self._inv_scale: Tensor | None = None

    _group_keys = ("rho", "adaptive", "eta")

    def _check_group(self, group: dict) -> None:
        _check_nonneg("rho", group["rho"])
        _check_nonneg("eta", group["eta"])

    # A function called with the sum of squares of the (ASAM-weighted) gradients, a 0-dim fp32
    # device tensor, before its square root becomes the norm; it may change it in place (a
    # distributed all-reduce goes here). None: no call.
    _reduce_sq: Callable[[Tensor], None] | None = None
    # A SAM variant's own perturbation direction: parameter-sized buffers (plan.Buffers) the
    # first step perturbs along, in place of the gradients. None: the gradients.
    _direction: Buffers | None = None

    def _combine(self, plan: StepPlan) -> None:
        """A SAM variant's gradient combination: called by ``second_step`` after the gradients were
        checked and before the update, with the step's plan (its buckets list the parameters as
        the kernels see them); may rewrite ``p.grad`` in place. FusedSAM's does nothing."""

    # ------------------------------------------------------------------ SAM
    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a grad to ``w + e(w)``, keeping an exact backup of ``w``.

        Raises, with nothing written, on a bad gradient or hyperparameter, or when the parameters
        are already perturbed (call ``second_step()`` or ``restore()`` first)."""
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: the parameters are already perturbed; call second_step() to "
                "update them, or restore() to undo the perturbation"
            )
        plan = self._step_plan()
        try:
            self.grad_norm = self._backend.perturb(plan, self._reduce_sq, self._direction) if plan.active else None
        finally:
            self._backend.plans.end_pass()
        self._perturbed = plan
        if zero_grad:
            self.zero_grad()

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
            self._combine(plan)
            self._backend.restore_and_update(self._perturbed, plan, amp)
        finally:
            self._backend.plans.end_pass()
        self._perturbed = None
        self._opt_called = True  # tells LR schedulers that the optimizer has stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One SAM step: ``closure`` runs forward + backward and returns the loss (called twice).

        Returns the loss of the first call, at the unperturbed weights. If the second call (or the
        update) raises, the weights are restored exactly before the exception propagates.
        """
        if closure is None:
            raise RuntimeError(
                "FusedSAM.step() needs a closure that runs forward and backward and returns the loss; "
                "or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
            self.second_step()
        except BaseException:
            self.restore()
            raise
        return loss
