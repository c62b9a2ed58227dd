"""``MSAM``: Momentum-SAM (Becker et al., 2024), SAM at the cost of one forward/backward per step."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..backends import BACKENDS
from ..backends.amp import check_amp
from ..backends.amp import Amp, passed_by_scaler
from ..backends.optim_state import FUSED_KINDS, check_state, init_state, state_keys, update_scalars
from ..backends.reference import msam_moment, msam_next_inv, msam_perturb_, msam_restore_, msam_update_
from ..distributed import local
from ..plan import StepPlan
from .base import SAMOptimizer, _called_by_dcp_state_init, _capturing, _check_nonneg, _eager, _unwrapping

MAX_RHO = 100.0  # see MSAM's docstring: the arithmetic restore's bound


def _check_rho(name: str, value) -> None:
    _check_nonneg(name, value)
    if value > MAX_RHO:
        raise ValueError(
            f"{name} must be at most {MAX_RHO:g} for MSAM, got {value!r}: the weights are put back "
            f"arithmetically, w = (w - r m) + r m with ||r m|| = rho, which in fp32 keeps w only to about "
            f"rho * 2^-23 per element; beyond {MAX_RHO:g} that loses the weights' bits (and a perturbation "
            f"that large has no use)"
        )


class MSAM(SAMOptimizer):
    """Momentum-SAM: the weights are perturbed along the negative momentum instead of a fresh
    gradient, so a step costs one forward/backward, like the base optimizer's.

    Args:
        params: parameters or param groups; a group may set its own ``rho`` and any base-optimizer
            hyperparameter.
        base_optimizer: ``torch.optim.SGD`` (with ``momentum > 0``, no dampening, no Nesterov),
            ``torch.optim.AdamW`` or ``torch.optim.Adam`` (no amsgrad), the class.
        rho: the radius (0 to ``MSAM.MAX_RHO`` = 100, see below), ``||e||`` of the perturbation along the normalized momentum. The default
            3 is the authors' value on every task of their paper (ResNets and ViTs on CIFAR-100 and
            ImageNet, SGD and AdamW), far larger than SAM's because the momentum direction is not the
            gradient's; it is a radius for large models. It is too large when it is a large fraction
            of the weights' norm: the gradient is then taken far from ``w``. On the small models of
            ``sam-fused compare`` (||w|| 9-26) rho 3 is 0.12-0.32 of it and stopped the transformer
            encoder from training (a user reported the same of a 38K-parameter CNN); 0.3 trained
            every one of them. The first step measures
            ``rho / ||w||`` (``perturbation_fraction``, one host read) and warns once
            (``LargePerturbationWarning``) above 0.1.
            A group's rho may be changed between steps (a schedule, :class:`~sam_fused.RhoFollowsLR`):
            the next step makes its perturbation with the new value, while the perturbation in place is
            undone with the rho that made it (kept per group).
        backend: as for :class:`~sam_fused.FusedSAM` (``"torch"`` is the reference).
        **base_kwargs: handed to the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    The rules are the authors' (``optimizer/msam.py`` and ``optimizer/adamW_msam.py`` of their
    code), per parameter with a gradient, ``m`` the momentum buffer (SGD) or ``exp_avg`` (Adam):

    * the forward and backward run at the perturbed point ``w - r m``;
    * ``step()``: back to ``w`` by ``+ r m`` (the old ``r`` and ``m``: the rho of the last step, not
      an edited one), the base update (SGD: weight
      decay added to the gradient with the perturbed weights; AdamW: the decay after the Adam step),
      then ``r = rho / (||m|| + 1e-12)`` over every parameter with a gradient and ``w - r m`` again.
      The first step starts from a zero momentum and no perturbation.

    Fused: the restore, the update and the sum of squares of the new momentum in one pass, the
    perturbation in a second; the norm stays on the device (and is all-reduced under FSDP2). Bytes
    per parameter (fp32): 32 with SGD (torch's fused SGD: 20), 40 with AdamW (28); no backup.

    **What the model holds.** Outside :meth:`unperturbed`, the parameters (and so
    ``model.state_dict()``) are the perturbed weights ``w - r m`` the next forward runs at, not
    ``w``. To evaluate or export ``w``, use ``with opt.unperturbed(): ...``; on exit the weights
    are put back where they were, bit for bit (unless the block wrote to them: then they are
    perturbed again from what it wrote). To end training, :meth:`restore` puts them at ``w`` for
    good (the authors' ``move_back_from_momentumAscent``). A checkpoint of the perturbed model
    with ``opt.state_dict()`` (which holds ``r``'s norm, the rho it was made with and which
    parameters are perturbed) resumes bit-identically. A checkpoint taken inside
    :meth:`unperturbed` holds ``w``, and its ``opt.state_dict()`` says that nothing is perturbed:
    it resumes as :meth:`restore` followed by the next steps would go on (the first forward after
    the resume runs at ``w``).

    **The bound on rho.** The way back to ``w`` is arithmetic, ``(w - r m) + r m``, not a copy:
    with ``||r m|| = rho`` it is exact to about ``rho * 2^-23`` per element in fp32 at worst
    (bf16/fp16 parameters: their own rounding, far coarser): at the authors' 3, 4e-7, a few units
    in the last place of a weight of order 1; at 100, 1.2e-5; at rho = 1e6 it moves ``w`` by ~7e-3
    (a small MLP, one step with lr 0). Rather than keep a parameter-sized copy, MSAM refuses rho
    above ``MSAM.MAX_RHO`` = 100 (at construction, in ``add_param_group`` and in each step's check
    of the groups, before anything is written): a practical, model-independent rule (the precision
    lost relative to the weights depends on their size, which is not checked), and a radius of 100
    is already larger than the weights of most models.

    AMP: ``scaler.step(opt)`` after ``scaler.scale(loss).backward()``; an inf or NaN leaves
    weights, momentum and perturbation as they were. ``step(closure)`` calls the closure once.
    """

    MAX_RHO = MAX_RHO
    _group_keys = ("rho",)
    _step_supports_amp_scaling = True
    _keeps_backups = False  # the restore is arithmetic: no parameter-sized backup

    def __init__(self, params: Iterable, base_optimizer: type = torch.optim.SGD, rho: float = 3.0,
                 backend: str | None = None, **base_kwargs) -> None:
        _check_rho("rho", rho)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or None")
        kind = FUSED_KINDS.get(base_optimizer) if isinstance(base_optimizer, type) else None
        if kind is None:
            raise TypeError(
                f"MSAM runs over torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW (the class), got {base_optimizer!r}"
            )
        self._kind = kind
        super().__init__(params, base_optimizer, dict(rho=rho), backend, base_kwargs)
        for group in self.param_groups:
            self._check_base(group)
        self._inv: Tensor | None = None  # 1 / (||m|| + 1e-12) of the last step, fp32 on the device
        self._inv_spare: Tensor | None = None
        self._msam_perturbed: dict[int, Tensor] = {}  # id -> parameter, those at w - r m now
        # per group (position): the rho its perturbation was made with; None (or absent): the group's rho
        self._msam_rho: list[float | None] = []
        self._fast_plan: StepPlan | None = None  # the plan whose active parameters are exactly those
        self._outside: list | None = None  # inside unperturbed(): what to put back on exit

    def _check_group(self, group: dict) -> None:
        _check_rho("rho", group["rho"])
        base = getattr(self, "base_optimizer", None)
        if base is not None:  # a group being added has only the keys it was given: the defaults fill it
            self._check_base(group if all(k in group for k in base.defaults) else {**base.defaults, **group})

    def _rho_of(self) -> dict[int, float]:
        """id(group) -> the rho of the perturbation its parameters are at (the rho of the step that
        made it, whatever the group says now)."""
        applied = self._msam_rho
        return {id(g): (applied[i] if i < len(applied) and applied[i] is not None else g["rho"])
                for i, g in enumerate(self.param_groups)}

    def _check_base(self, group: dict) -> None:
        """The base optimizer's options that the authors' rules cover; a clear error for the rest."""
        if self._kind == "sgd":
            if not group["momentum"] or group["momentum"] < 0:
                raise ValueError("MSAM over SGD perturbs along the momentum: momentum must be > 0")
            if group.get("dampening", 0) or group.get("nesterov", False):
                raise ValueError("MSAM over SGD follows the authors' rule: no dampening, no Nesterov")
        elif group.get("amsgrad", False):
            raise ValueError("MSAM over Adam/AdamW: amsgrad is not supported")
        if group.get("maximize", False):
            raise ValueError("MSAM: maximize is not supported")
        if group.get("capturable", False) or group.get("differentiable", False):
            raise ValueError("MSAM: capturable and differentiable base optimizers are not supported")
        for key in ("lr", "weight_decay", "momentum", "betas", "eps"):
            v = group.get(key)
            if isinstance(v, Tensor) or (isinstance(v, tuple) and any(isinstance(x, Tensor) for x in v)):
                raise ValueError(f"MSAM: a tensor {key} is not supported; use a float")

    # ------------------------------------------------------------------ the step
    @_unwrapping
    @_eager
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Momentum-SAM step with the gradients of the backward that ran at the perturbed weights
        (``closure``, when given, runs forward and backward there first and its loss is returned).

        Raises, with nothing written, on a bad gradient, hyperparameter or optimizer state, and
        inside :meth:`unperturbed`."""
        amp = self._scaler_amp()
        if self._outside is not None:
            raise RuntimeError("MSAM.step() inside unperturbed(): the weights are not where the gradient was taken")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if closure is None and amp is None and not self.state and _called_by_dcp_state_init():
            self.base_optimizer.step()  # torch.distributed.checkpoint creating a fresh optimizer's state
            return None
        self._check_groups()
        plan = self._backend.plan()
        try:
            if not plan.active:
                if not self.__dict__.get("_warned_no_grad", False):
                    self._warned_no_grad = True
                    warnings.warn("MSAM.step() found no gradient on any parameter: nothing was done (said once)",
                                  stacklevel=2)
                return loss
            if amp is not None:
                check_amp(plan, amp)
            device = plan.locals[0].device
            if self._inv is None or self._inv.device != device:
                self._inv = torch.zeros((), dtype=torch.float32, device=device)
            if self._inv_spare is None or self._inv_spare.device != device:
                self._inv_spare = torch.empty((), dtype=torch.float32, device=device)
            fast = plan is self._fast_plan
            reduce = self._backend.plans.params.reduce_sq
            w_sq = None
            if self._perturbation_checks > 0 and not _capturing():  # ||w|| before this step moves it
                w_sq = torch.zeros((), dtype=torch.float64, device=device)
                for t in plan.locals:
                    w_sq += torch.linalg.vector_norm(t.detach(), dtype=torch.float64) ** 2
            made = run_step(self._backend, self, plan, self._kind, self._inv, self._inv_spare, amp,
                            self._msam_perturbed, fast, reduce, self._rho_of())
        finally:
            self._backend.plans.end_pass()
        if made:  # (an inf found on the device keeps the old perturbation: only when no rho changed)
            self._inv, self._inv_spare = self._inv_spare, self._inv
            self._msam_rho = [g["rho"] for g in self.param_groups]
            if not fast:
                self._msam_perturbed = {id(p): p for p in plan.active}
                self._fast_plan = plan
        if w_sq is not None:
            self._measure_perturbation(w_sq)
        self._opt_called = True
        return loss

    def _measure_perturbation(self, w_sq: Tensor) -> None:
        """At the first step that perturbs: ``||e|| = ||r m||`` (rho when every group has the same
        rho: the radius along the normalized momentum) against ``||w||`` of the parameters it
        moves, then :meth:`_note_perturbation` (one host read; nothing after the first step)."""
        e_sq = torch.zeros((), dtype=torch.float64, device=w_sq.device)
        inv = self._inv.to(torch.float64)
        for rho, _, m in self._perturbed_pairs():  # the radius the perturbation was made with
            e_sq += (rho * inv * torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
        rhos = sorted({float(g["rho"]) for g in self.param_groups})
        self._note_perturbation(e_sq, w_sq, "rho " + "/".join(f"{r:g}" for r in rhos)
                                + ": ||e|| = rho, along the normalized momentum")

    def _scaler_amp(self):
        """(inv_scale, found_inf) when called by ``GradScaler.step(opt)``, else None."""
        passed = passed_by_scaler(self)
        return None if passed is None else (torch.reciprocal(passed[0]), passed[1])

    # ------------------------------------------------------------------ the weights
    def _perturbed_pairs(self) -> list[tuple[float, Tensor, Tensor]]:
        """(rho of its perturbation, parameter, m) of every perturbed parameter, group order."""
        out = []
        rho_of = self._rho_of()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._msam_perturbed:
                    out.append((rho_of[id(group)], p, local(msam_moment(self._kind, self.state[p]))))
        return out

    @_unwrapping
    @torch.no_grad()
    def restore(self) -> bool:
        """Put every perturbed parameter at ``w`` for good (the end of training; the authors'
        ``move_back_from_momentumAscent``); the next ``step()`` starts from there without a restore.
        Returns whether anything was perturbed."""
        if self._outside is not None:
            raise RuntimeError("MSAM.restore() inside unperturbed()")
        pairs = self._perturbed_pairs()
        for rho, p, m in pairs:
            msam_restore_(p, m, rho, self._inv)
        self._msam_perturbed = {}
        self._fast_plan = None
        return bool(pairs)

    @contextlib.contextmanager
    def unperturbed(self):
        """Inside, the parameters are ``w`` (evaluate, save ``model.state_dict()``, and with it
        ``opt.state_dict()``, which then says that nothing is perturbed); on exit they are perturbed
        again, bit-identical to before, unless the block wrote to one (then from its new value, with
        the same radius). ``step()`` is refused inside."""
        if self._outside is not None:
            raise RuntimeError("unperturbed() is already active")
        saved = []
        with torch.no_grad():
            for rho, p, m in self._perturbed_pairs():
                t = local(p).detach()
                before = t.clone()
                msam_restore_(p, m, rho, self._inv)
                saved.append((rho, p, m, before, t._version))
        self._outside = saved
        try:
            yield self
        finally:
            self._outside = None
            with torch.no_grad():
                for rho, p, m, before, version in saved:
                    t = local(p).detach()
                    if t._version == version:
                        t.copy_(before)
                    else:  # the block changed the weights: perturb what it wrote (the same radius)
                        msam_perturb_(p, m, rho, self._inv)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The base optimizer's state dict; each param group also carries ``msam_inverse_norm`` (the
        last step's ``1 / (||m|| + 1e-12)``, fp32 as a float: one host read, at checkpoint time
        only), ``msam_perturbed`` (the positions in the group of the parameters perturbed now) and
        ``msam_rho`` (the rho their perturbation was made with), so the entries travel wherever
        param groups do (``torch.distributed.checkpoint`` included). Inside :meth:`unperturbed`
        the parameters hold ``w``, and the state dict says so: nothing is perturbed (a resume from
        it starts at ``w``, as after :meth:`restore`)."""
        sd = self.base_optimizer.state_dict()
        inv = 0.0 if self._inv is None else float(self._inv)
        perturbed = {} if self._outside is not None else self._msam_perturbed
        if perturbed and not self.__dict__.get("_warned_perturbed_save", False):
            self._warned_perturbed_save = True
            warnings.warn(
                "MSAM.state_dict() while the parameters hold the perturbed weights w - rho m/||m||: this checkpoint "
                "resumes correctly, but a model saved or evaluated now is not the trained w. Save and evaluate the "
                "model inside `with opt.unperturbed():` (or after opt.restore()) (said once)", stacklevel=3)
        rho_of = self._rho_of()
        for saved, group in zip(sd["param_groups"], self.param_groups):
            saved["msam_inverse_norm"] = inv
            saved["msam_perturbed"] = [i for i, p in enumerate(group["params"]) if id(p) in perturbed]
            saved["msam_rho"] = float(rho_of[id(group)])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of :meth:`state_dict`; refuses, with nothing changed, one without the
        Momentum-SAM entries or whose entries do not fit the parameters. A checkpoint without
        ``msam_rho`` (written before it was saved) undoes its perturbation with the group's rho."""
        if self._outside is not None:
            raise RuntimeError("load_state_dict() inside unperturbed()")
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any("msam_perturbed" not in g for g in groups):
            raise ValueError("this state dict has no Momentum-SAM entries (msam_perturbed, msam_inverse_norm in "
                             "each param group): it was not saved by MSAM.state_dict()")
        invs = {g.get("msam_inverse_norm") for g in groups}
        inv = next(iter(invs))
        if len(invs) != 1 or not isinstance(inv, (int, float)) or not 0.0 <= inv < float("inf"):
            raise ValueError(f"MSAM state: msam_inverse_norm must be one finite non-negative number, got {sorted(map(repr, invs))}")
        for g in groups:
            if "msam_rho" in g:
                _check_rho("MSAM state: msam_rho", g["msam_rho"])
        key = "momentum_buffer" if self._kind == "sgd" else "exp_avg"
        saved_state = state_dict.get("state", {})
        chosen = []
        for saved, group in zip(groups, self.param_groups):
            idx = saved["msam_perturbed"]
            ids = saved.get("params", [])
            if any(not isinstance(i, int) or not 0 <= i < len(group["params"]) for i in idx):
                raise ValueError(f"MSAM state: perturbed positions {idx} out of range for a group of "
                                 f"{len(group['params'])} parameters")
            for i in idx:
                pid = ids[i] if i < len(ids) else None
                if pid is not None and key not in saved_state.get(pid, {}):
                    raise ValueError(f"MSAM state: a perturbed parameter has no {key} in the state")
                chosen.append(group["params"][i])
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the entries describe the checkpoint, not a hyperparameter
            group.pop("msam_perturbed", None)
            group.pop("msam_inverse_norm", None)
            group.pop("msam_rho", None)
            self._check_base(group)
        device = chosen[0].device if chosen else (self._inv.device if self._inv is not None else None)
        if device is None:
            params = [p for g in self.param_groups for p in g["params"]]
            device = params[0].device if params else torch.device("cpu")
        self._inv = torch.tensor(float(inv), dtype=torch.float32, device=device)
        self._msam_perturbed = {id(p): p for p in chosen}
        self._msam_rho = [float(g["msam_rho"]) if "msam_rho" in g else None for g in groups]
        self._fast_plan = None

    def invalidate(self) -> None:
        super().invalidate()
        self._fast_plan = None

    def __getstate__(self) -> dict:
        if self._outside is not None:
            raise RuntimeError("an MSAM inside unperturbed() cannot be copied or pickled")
        state = super().__getstate__()
        state["_fast_plan"] = None
        state["_msam_perturbed"] = list(self._msam_perturbed.values())  # ids do not survive a copy
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._fast_plan = None
        self._outside = None
        self._msam_perturbed = {id(p): p for p in self._msam_perturbed}
        self.__dict__.setdefault("_msam_rho", [])


# ------------------------------------------------------------------ the order of a step, on every backend
class MSAMPass:
    """What one Momentum-SAM step does, decided before the first write: ``ref``, the (group, param)
    pairs the reference ops take (every pair on the torch backend); ``stale``, (group, param) of
    parameters perturbed at the last step without a gradient now (put back, not updated);
    ``skip_on_device``, whether AMP's found_inf is left to the kernels."""

    def __init__(self, ref, stale, skip_on_device: bool) -> None:
        self.ref, self.stale, self.skip_on_device = ref, stale, skip_on_device

def plan_pass(backend, opt, plan: StepPlan, kind: str, perturbed: dict, fast: bool, amp: Amp | None,
              rho_of: dict):
    """Check every state tensor the step will touch (raises before any write) and decide what runs
    where. ``perturbed``: id(param) -> param of the parameters perturbed now; ``fast``: they are
    exactly ``plan.active`` (the steady state: nothing to compare); ``rho_of``: id(group) -> the rho
    its perturbation was made with. AMP's found_inf is left to the kernels only when no group's rho
    changed since (a skipped step keeps the old perturbation, and so its radius: the optimizer then
    needs to know on the host whether the step was skipped). Returns a callable that makes
    the launches (it creates missing state and counts Adam's steps: call it only once the step is
    certain), and the :class:`MSAMPass` skeleton."""
    state = opt.base_optimizer.state
    make = backend.msam_prepare(kind, plan)
    ref = [(g, p) for g, p, _ in plan.slow]
    if make is None:  # no fused launches: every parameter by the reference ops
        ref = [(b.group, p) for b in plan.buckets for p in b.owners] + ref
    for group, p in ref:
        st = state.get(p)
        if st:
            check_state(kind, local(p), _local_state(st), state_keys(kind, group))
    stale = []
    if not fast and perturbed:
        active = set(map(id, plan.active))
        stale = [(g, p) for g in opt.param_groups for p in g["params"] if id(p) in perturbed and id(p) not in active]
        for group, p in stale:
            st = state.get(p)
            if not st or "momentum_buffer" not in st and "exp_avg" not in st:
                raise RuntimeError("a perturbed parameter lost its optimizer state: its perturbation cannot be undone")
            check_state(kind, local(p), _local_state(st), state_keys(kind, group))
    skip_on_device = (amp is not None and kind == "sgd" and fast and not ref and make is not None
                      and all(rho_of[id(g)] == g["rho"] for g in opt.param_groups))
    return make, MSAMPass(ref, stale, skip_on_device)

def _local_state(st: dict) -> dict:
    return {k: local(v) if isinstance(v, Tensor) else v for k, v in st.items()}

def run_step(backend, opt, plan: StepPlan, kind: str, inv: Tensor, inv_next: Tensor, amp: Amp | None,
             perturbed: dict, fast: bool, reduce, rho_of: dict) -> bool:
    """One Momentum-SAM step (both passes) with ``inv`` the old inverse norm and ``rho_of``
    (id(group) -> rho) the radius each group's perturbation was made with; ``inv_next`` receives
    the new one, and the new perturbation has each group's rho now. Returns False when AMP's
    found_inf was read on the host and the step skipped (nothing written); True otherwise (with an
    inf found on the device, the kernels wrote nothing and ``inv_next`` = ``inv``)."""
    make, work = plan_pass(backend, opt, plan, kind, perturbed, fast, amp, rho_of)
    if amp is not None and not work.skip_on_device and float(amp[1]) != 0.0:
        return False
    # every check has passed: from here on, only writes
    state = opt.base_optimizer.state
    for group, p in work.stale:
        msam_restore_(p, local(msam_moment(kind, state[p])), rho_of[id(group)], inv)
    launches = make() if make is not None else []
    if not fast and launches:
        launches = _split_restore(launches, perturbed, rho_of)
    else:
        launches = [(b, u, rho_of[id(b.group)] if perturbed else None) for b, u in launches]
    extra = None
    inv_scale = None if amp is None else amp[0]
    for group, p in work.ref:
        st = state[p]
        if st.get("momentum_buffer" if kind == "sgd" else "exp_avg") is None:
            init_state(kind, st, p)
        step = 1.0
        if kind == "adam":
            st["step"] += 1
            step = float(st["step"])
        u = update_scalars(kind, group, opt.base_optimizer, step)
        s = msam_update_(kind, u, p, _local_state(st), id(p) in perturbed, rho_of[id(group)], inv, inv_scale)
        extra = s if extra is None else extra + s
    sq = backend.msam_update(launches, inv, inv_next, amp, extra, plan.locals[0].device)
    if reduce is not None:
        reduce(sq)
        msam_next_inv(sq, inv, None if amp is None else amp[1], out=inv_next)
    for bucket, _, _ in launches:
        backend.msam_perturb(bucket, inv_next, amp)
    for group, p in work.ref:  # never with a device-side skip (skip_on_device excludes them)
        msam_perturb_(p, local(msam_moment(kind, state[p])), group["rho"], inv_next)
    return True

def _split_restore(launches, perturbed: dict, rho_of: dict):
    """Each launch split into its perturbed rows (restored with their group's old rho) and the
    others (not), as needed: (bucket, update, restore_rho or None) triples."""
    out = []
    for bucket, u in launches:
        flags = [id(p) in perturbed for p in bucket.owners]
        rho = rho_of[id(bucket.group)]
        if all(flags):
            out.append((bucket, u, rho))
        elif not any(flags):
            out.append((bucket, u, None))
        else:
            out.append((bucket.rows([i for i, f in enumerate(flags) if f]), u, rho))
            out.append((bucket.rows([i for i, f in enumerate(flags) if not f]), u, None))
    return out
