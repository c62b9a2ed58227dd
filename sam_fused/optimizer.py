"""``FusedSAM``: Sharpness-Aware Minimization as a drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor

from .backends import BACKENDS, make_backend
from .backends.base import GroupWork

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_nonneg(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class SAMOptimizer(torch.optim.Optimizer):
    """What every SAM-family optimizer here shares: the base optimizer built on the same param groups,
    its state dict, param groups with per-group SAM hyperparameters, validation and the backend.

    Subclasses name their per-group keys in ``_group_keys`` and check them in ``_check_group``.
    """

    _group_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, base_optimizer: type, defaults: dict, backend, base_kwargs: dict,
                 make_backend) -> None:
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
        self._backend = make_backend(backend, self)

    @property
    def backend(self) -> str:
        """Name of the backend in use."""
        return self._backend.name

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

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
        self._backend.invalidate()

    def state_dict(self) -> dict:
        """The base optimizer's state dict; SAM's scratch buffers are never saved."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key in self._group_keys:
                group.setdefault(key, self.defaults[key])
        self._backend.invalidate()

    def _collect(self) -> list[GroupWork]:
        """Params with a grad, per group; refuses bad input before anything is touched."""
        name = type(self).__name__
        work = []
        for i, group in enumerate(self.param_groups):
            self._check_group(group)
            gw = GroupWork(i, group)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if p.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"{name} supports float32, bfloat16, float16 and float64 parameters, got {p.dtype}")
                gw.params.append(p)
            if gw.params:
                work.append(gw)
        return work


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
        super().__init__(params, base_optimizer, defaults, backend, base_kwargs, make_backend)
        self._perturbed: list[Tensor] | None = None
        self.grad_norm: Tensor | None = None

    _group_keys = ("rho", "adaptive", "eta")

    def _check_group(self, group: dict) -> None:
        _check_nonneg("rho", group["rho"])
        _check_nonneg("eta", group["eta"])

    # ------------------------------------------------------------------ SAM
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a grad to ``w + e(w)``, keeping an exact backup of ``w``."""
        work = self._collect()
        if work:
            self.grad_norm = self._backend.perturb(work)
        self._perturbed = [p for gw in work for p in gw.params]
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` bit-identically, then apply the base optimizer with the current grads."""
        if self._perturbed is None:
            raise RuntimeError("second_step() called without a preceding first_step()")
        work = self._collect()  # refuses bad gradients before anything is restored
        self._backend.restore_and_update(self._perturbed, work)
        self._perturbed = None
        self._opt_called = True  # tells LR schedulers that the optimizer has stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One SAM step: ``closure`` runs forward + backward and returns the loss (called twice).

        Returns the loss of the first call, at the unperturbed weights.
        """
        if closure is None:
            raise RuntimeError(
                "FusedSAM.step() needs a closure that runs forward and backward and returns the loss; "
                "or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss
