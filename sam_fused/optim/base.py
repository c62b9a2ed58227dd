"""What every SAM-family optimizer shares: ``SAMOptimizer`` (the base optimizer built on the same param
groups, its state dict, per-group hyperparameters and their validation, the backend and its cached
step plans, copying and pickling), the backward watch of ``step(closure)``, and the checks."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import weakref
import warnings
from itertools import chain
from typing import Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.utils.weak import WeakIdKeyDictionary

from ..backends import make_backend
from ..nn import frozen_running_stats
from ..backends.optim_state import check_checkpoint_state
from ..plan import StepPlan

_UNMADE: list = []  # the _eager wrappers whose torch.compiler.disable is not made yet


def _eager(method):
    """``torch.compiler.disable(method)``, made when the first optimizer is built (``_make_eager``).
    Inside a function compiled with torch.compile, the steps run eagerly (a graph break): traced,
    the reference backend's backup copy was reordered after the perturbation (the weights were
    never restored) and the native and Triton launches cannot be traced at all. Made at import,
    the wrapper would import ``torch._dynamo`` (a third of a second, with sympy) into every
    ``import sam_fused``; torch's ``Optimizer.__init__`` imports it anyway. Every instance is
    built by ``SAMOptimizer.__init__`` or unpickled by its ``__setstate__``, which make them."""
    target = [method]

    @functools.wraps(method)
    def run(*args, **kwargs):
        return target[0](*args, **kwargs)

    def make():
        target[0] = torch.compiler.disable(method)

    _UNMADE.append(make)
    return run


def _make_eager() -> None:
    while _UNMADE:
        _UNMADE.pop()()


def _unwrapping(method):
    """Run the method on the optimizer itself when called through a wrapper that copied its
    ``__dict__`` and subclasses its class (Lightning's ``LightningOptimizer``, which keeps it as
    ``_optimizer``): state set on the copy would be lost (the LR scheduler would never learn that
    the optimizer stepped, a perturbation would be invisible to the optimizer)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        inner = self.__dict__.get("_optimizer")
        if isinstance(inner, SAMOptimizer) and inner is not self:
            return getattr(inner, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return run


def _with_torch_hooks(name: str, method):
    """``method`` (``state_dict``, ``load_state_dict`` or ``second_step``) with the hooks torch.optim
    runs around it, on its outermost call only (an override that calls ``super()`` runs them once).
    ``second_step`` runs the step hooks (global and the optimizer's own) when the user calls it:
    called from ``step()``, whose hooks torch.optim's wrapper ran already, it runs none."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        active = self.__dict__.setdefault("_hooks_active", set())
        if name in active or (name == "second_step" and self.__dict__.get("_in_step")):
            return method(self, *args, **kwargs)
        active.add(name)
        try:
            if name == "state_dict":
                for hook in list(self._optimizer_state_dict_pre_hooks.values()):
                    hook(self)
                out = method(self, *args, **kwargs)
                for hook in list(self._optimizer_state_dict_post_hooks.values()):
                    result = hook(self, out)
                    out = out if result is None else result
                return out
            if name == "load_state_dict":
                kwargs = dict(kwargs)
                state_dict = dict(args[0] if args else kwargs.pop("state_dict"))  # torch's DCP passes it by name
                for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
                    result = hook(self, state_dict)
                    state_dict = state_dict if result is None else result
                out = method(self, state_dict, *args[1:], **kwargs)
                for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
                    hook(self)
                return out
            for hook in list(chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values())):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                    args, kwargs = result
            out = method(self, *args, **kwargs)
            for hook in list(chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values())):
                hook(self, args, kwargs)
            return out
        finally:
            active.discard(name)

    run._torch_hooks = True
    return run


_HOOKED_METHODS = ("state_dict", "load_state_dict", "second_step")


def _called_by_dcp_state_init() -> bool:
    """Whether this ``step()`` comes from ``torch.distributed.checkpoint``'s state initialization
    (``set_optimizer_state_dict`` on an optimizer without state), a few frames up."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and frame.f_globals.get("__name__", "").startswith(
                "torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def _caller_level() -> int:
    """The ``stacklevel`` of a warning raised by the caller of this function that names the first
    frame outside sam_fused and torch (the user's line), whichever wrappers the step went through."""
    import os

    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _capturing() -> bool:
    """Whether a CUDA graph is being captured now (no host read may happen then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_nonneg(name: str, value) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < float("inf")
            or value > 1e30):
        raise ValueError(f"{name} must be a finite non-negative number (at most 1e30), got {value!r}")


def _check_positive(name: str, value) -> None:
    """Like :func:`_check_nonneg`, and not zero (a scale that divides)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < float("inf")
            or value > 1e30):
        raise ValueError(f"{name} must be a finite positive number (at most 1e30), got {value!r}")


# The fraction of the weights' norm above which a perturbation is warned about (once, at the first
# step that perturbs). The gradient of a SAM step is taken at w + e: at ||e|| = 0.1 ||w|| the loss
# there may say little about the loss at w, and in the compare tasks every SAM run whose radius
# was beyond this fraction stopped training or was unstable (benchmarks/NOTES.md, "Default radii").
# It is not a bound that guarantees training below it: on those small models SAM stopped at 2-4%
# already. Tuned models (WRN-28-10 at rho 0.05) sit far below, at ~0.1%.
LARGE_PERTURBATION = 0.1


class LargePerturbationWarning(UserWarning):
    """The first perturbation of a SAM-family optimizer is a large fraction of the weights' norm."""


class _BackwardSeen:
    """A post-accumulate-grad hook on every parameter: set when a backward has written a gradient.
    It holds no reference to the optimizer (the hooks live on the parameters)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, _param: Tensor) -> None:
        self.seen = True


class BackwardWatch:
    """Tells whether a backward pass reached the parameters since the last SAM step: what
    ``step(closure)`` needs to know to serve both closure conventions. The hooks are registered on
    the first ``step(closure)`` (users of ``first_step``/``second_step`` never pay for them), once
    per parameter; each costs one Python call per parameter per backward."""

    def __init__(self) -> None:
        self.flag = _BackwardSeen()
        self._hooks = WeakIdKeyDictionary()  # parameter -> hook handle
        self._bound = None  # the plan cache's ParamSet the hooks were checked against
        self._frozen: list[Tensor] = []  # parameters without requires_grad when last checked: no hook yet

    def backward_ran(self, opt: "SAMOptimizer") -> bool:
        """Whether a backward wrote gradients since the last ``clear()``. On the first call, when no
        hook can have fired yet, whether any parameter has a gradient at all; likewise for a
        parameter unfrozen since (``requires_grad`` turned on), the first time it is seen."""
        params = opt._backend.plans.params
        if params is None or params is not self._bound:
            first = not self._hooks
            self._frozen = []
            for group in opt.param_groups:
                for p in group["params"]:
                    if p in self._hooks:
                        continue
                    if not p.requires_grad:  # a hook cannot be put on it until it is unfrozen
                        self._frozen.append(p)
                        continue
                    self._hooks[p] = p.register_post_accumulate_grad_hook(self.flag)
                    if first and p.grad is not None:
                        self.flag.seen = True
            self._bound = params
        if not self.flag.seen and self._frozen:
            # only when no hook fired: a backward may have reached only layers unfrozen since
            still = []
            for p in self._frozen:
                if not p.requires_grad:
                    still.append(p)
                    continue
                self._hooks[p] = p.register_post_accumulate_grad_hook(self.flag)
                if p.grad is not None:  # its gradient can only come from a backward since it was unfrozen
                    self.flag.seen = True
            self._frozen = still
        return self.flag.seen

    def clear(self) -> None:
        self.flag.seen = False


class SAMOptimizer(torch.optim.Optimizer):
    """What every SAM-family optimizer here shares: the base optimizer built on the same param groups,
    its state dict, param groups with per-group SAM hyperparameters, validation, the backend (and
    through it the cached step plans), copying and pickling.

    Subclasses name their per-group keys in ``_group_keys``, check them in ``_check_group`` and
    name the backend factory in ``_backend_factory`` (a function of (name, optimizer)).
    """

    _group_keys: tuple[str, ...] = ()
    _backend_factory = staticmethod(make_backend)
    # ||e|| / ||w|| at the first step that perturbed (a float), None before it: measured once, with
    # one host read (see _note_perturbation); a step whose perturbation was skipped (an inf under
    # AMP) or zero measures again, at most _perturbation_checks times in all.
    perturbation_fraction: float | None = None
    _perturbation_checks = 20

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in _HOOKED_METHODS:  # torch.optim's hooks around every override, as around its own
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_torch_hooks", False):
                setattr(cls, name, _with_torch_hooks(name, method))

    def __init__(self, params: Iterable, base_optimizer: type, defaults: dict, backend, base_kwargs: dict) -> None:
        if not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass (the class, not an instance), "
                f"got {base_optimizer!r}"
            )
        super().__init__(params, dict(defaults, **base_kwargs))
        _make_eager()
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

    def freeze_running_stats(self, *modules: torch.nn.Module) -> "SAMOptimizer":
        """Let ``step(closure)`` keep BatchNorm's running statistics of ``modules`` (a model, or
        several) to one update per step: every closure call at a perturbed point (SAM's forward at
        ``w + e``, the universal class's samples) runs inside
        :func:`sam_fused.nn.frozen_running_stats`, so only the forward at ``w`` updates them, as in
        a plain step. Returns the optimizer. In a loop that runs its own passes, put the second
        forward inside ``frozen_running_stats(model)`` instead. Not saved in ``state_dict()``;
        copies and pickles forget it (they would otherwise copy the model)."""
        for m in modules:
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"freeze_running_stats() takes torch.nn.Module objects, got {type(m).__name__}")
        self._stats_of = [weakref.ref(m) for m in modules]
        return self

    def _frozen_stats(self):
        """The context of a closure call at a perturbed point (see ``freeze_running_stats``)."""
        refs = self.__dict__.get("_stats_of")
        if not refs:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for ref in refs:
            module = ref()
            if module is not None:
                stack.enter_context(frozen_running_stats(module))
        return stack
    def _note_perturbation(self, e_sq: Tensor, w_sq: Tensor, what: str) -> None:
        """Record ``perturbation_fraction = ||e|| / ||w||`` from the sums of squares of the
        perturbation and of the weights it moves (device tensors, local shards summed over FSDP2's
        ranks here), with one host read; warn once (:class:`LargePerturbationWarning`) when it is
        above :data:`LARGE_PERTURBATION`. ``what`` says what ``||e||`` is for this optimizer."""
        sums = []
        reduce = self._backend.plans.params.reduce_sq
        for sq in (e_sq, w_sq):
            sq = sq.to(torch.float64).reshape(())
            if reduce is not None:
                reduce(sq)
            sums.append(sq)
        e2, w2 = torch.stack(sums).tolist()  # the one host read
        self._perturbation_checks -= 1
        if not (math.isfinite(e2) and e2 > 0.0):
            return  # nothing was moved (a skipped perturbation): the next step measures
        self._perturbation_checks = 0
        e, w = math.sqrt(e2), math.sqrt(max(w2, 0.0))
        fraction = e / w if w > 0.0 else float("inf")
        self.perturbation_fraction = fraction
        if fraction > LARGE_PERTURBATION:
            warnings.warn(
                f"{type(self).__name__}: the first perturbation is {fraction:.3g} of the weights' norm (||e|| = {e:.3g}, "
                f"||w|| = {w:.3g} over the parameters it moves; {what}), above {LARGE_PERTURBATION:g}: the gradient "
                "is taken that far from w, where the loss may say little about w's, and training may stop (accuracy "
                "at chance). A radius tuned for a large model is too large for a small one: try a smaller rho "
                "(measured once, at the first step)", LargePerturbationWarning, stacklevel=_caller_level())

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

    def _refuse_complex(self, param_group: dict) -> None:
        params = param_group["params"]
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (got one of shape {tuple(p.shape)}, "
                    f"{p.dtype}): keep the real and imaginary parts as a real parameter (torch.view_as_real) and "
                    "form the complex tensor from it in the forward (torch.view_as_complex)")

    def add_param_group(self, param_group: dict) -> None:
        self._refuse_complex(param_group)
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
        """The base optimizer's state dict; SAM's scratch buffers are never saved.

        Refused between ``first_step()`` and ``second_step()``: the model's weights are then
        ``w + e``, and a checkpoint of them would resume from the wrong point with nothing to tell
        (a handler that saves at any moment, on preemption say, calls ``restore()`` first: it
        does nothing when no step is under way)."""
        if self._perturbed is not None:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() between first_step() and second_step(): the parameters are "
                "perturbed (w + e), so a checkpoint of the model now would hold the wrong weights. Save after "
                "second_step(), or call restore() first (a no-op when no step is under way)")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(): call restore() first")
        check_checkpoint_state(self.base_optimizer, state_dict)  # torch.optim would fail half-way with a KeyError
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key in self._group_keys:
                group.setdefault(key, self.defaults[key])
        self.invalidate()

    @_unwrapping
    @_eager
    @torch.no_grad()
    def restore(self) -> bool:
        """Undo a perturbation: every perturbed parameter gets back its exact value from before
        ``first_step()``; the gradients and the optimizer state are left alone. Returns whether
        there was a perturbation to undo."""
        plan, self._perturbed = self._perturbed, None
        if plan is None:
            return False
        self._end_step()
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
        for p, t, ptr, n in zip(plan.active, plan.locals, plan.ptrs, plan.numels):
            if t.data_ptr() == ptr and t.numel() == n:
                t.detach().copy_(self._backend.backups.get(p))
            else:
                moved += 1
        self.invalidate()
        raise RuntimeError(
            f"{moved} parameter(s) got new storage (p.data = ...) between first_step() and second_step(): their "
            "perturbation cannot be undone through them; the other parameters were restored and no update was made"
        )

    def _end_step(self) -> None:
        """A SAM step ended (updated or restored): forget what the step kept between its passes."""

    def _step_plan(self, perturbing: bool = False) -> StepPlan:
        """The cached plan of this step, after checking every grad and group (raises before any write).
        ``perturbing``: the plan of a perturbation, without the groups that set ``perturb=False``."""
        self._check_groups()
        skip = None
        if perturbing:
            skip = frozenset(i for i, g in enumerate(self.param_groups) if not g.get("perturb", True)) or None
            if skip:
                self._backend.plan()  # every gradient checked before the first write, the skipped ones too
        return self._backend.plan(skip)

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        if self._perturbed is not None:
            raise RuntimeError(
                f"a {type(self).__name__} between first_step() and second_step() cannot be copied or pickled: "
                "its parameters are perturbed and the backups are not part of it; call second_step() or restore()"
            )
        if hasattr(self, "_settle_count"):
            self._settle_count()
        state = dict(self.__dict__)
        state["_backend"] = self._backend.name
        for transient in ("_hooks_active", "_stats_of", "_grad_probe", "_left_probe", "_second_left_probe", "_skipped"):
            state.pop(transient, None)  # weak references and per-step marks: a copy starts without them
        state.pop("_in_step", None)
        state.pop("_watch", None)  # hooks on the parameters: a copy registers its own when it needs them
        return state

    def __setstate__(self, state: dict) -> None:
        torch.optim.Optimizer.__setstate__(self, state)
        _make_eager()  # unpickled in a process that built none
        self._backend = self._backend_factory(state["_backend"], self)
        self._perturbed = None
        if "_amp_first" in state:
            self._watch = BackwardWatch()


for _name in ("state_dict", "load_state_dict"):
    setattr(SAMOptimizer, _name, _with_torch_hooks(_name, SAMOptimizer.__dict__[_name]))
