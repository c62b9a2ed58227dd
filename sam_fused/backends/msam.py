"""Momentum-SAM's step over a plan: the reference ops (the oracle) and the order every backend follows.

Momentum-SAM (Becker et al., 2024) perturbs along the momentum instead of a fresh gradient, so a
step needs one forward/backward. Between steps every parameter that took part in the last step
sits at ``w - r m`` (``r = rho * inv``, ``inv = 1 / (||m|| + 1e-12)`` of that step, ``rho`` its
group's rho at that step, ``m`` SGD's momentum buffer or Adam's ``exp_avg``); the gradient ``g``
was taken there. The restore uses that ``r``: the rho that made the perturbation, kept by the
optimizer per group (``rho_of`` below), not the group's rho now, which may have been edited since
(a schedule, ``RhoFollowsLR``). Per parameter with a
gradient, in fp32 (fp64 for fp64 parameters), with the base optimizer's folded scalars
(``update_scalars.UpdateScalars.scalars()``):

    x = g * inv_scale             (AMP; else the gradient as it is)
    d = x + l2 * w                (SGD and Adam's L2 weight decay: at the weights where g was taken)
    w = w + r * m                 (the restore, with the old r and m; only for a perturbed parameter)
    SGD:   m = momentum * m + d;  w = w - lr * m
    Adam:  m = m + (1 - beta1) (d - m);  v = beta2 v + (1 - beta2) d^2
           w = w - step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps)
           w = w * (1 - lr * weight_decay)       (AdamW: the decay after the step, as the authors)
    sq += m^2                     (of m as stored, summed in fp64)

then ``inv = 1 / (sqrt(sq) + 1e-12)`` (fp32; all-reduced first under FSDP2; 0 when the norm is not
finite) and, per parameter, ``w = w - rho * inv * m``. With AMP, an inf or NaN found leaves weights, momentum, perturbation
and ``inv`` as they were. A parameter perturbed at the last step that has no gradient now is put
back (``w + r m``) and stays there until it has one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import NORM_EPS, OPT_SGD
from ..distributed import local
from ..plan import StepPlan
from ..update_scalars import UpdateScalars
from .amp import Amp
from .optim_state import check_state, state_keys

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch

    def _get_scalar_dtype() -> torch.dtype:
        return torch.get_default_dtype()


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def first_moment(kind: str, st: dict) -> Tensor:
    """The buffer Momentum-SAM perturbs along: SGD's momentum buffer, Adam's exp_avg."""
    return st["momentum_buffer" if kind == "sgd" else "exp_avg"]


def init_state(kind: str, st: dict, p: Tensor) -> None:
    """The state the authors start from: a zero momentum (SGD), torch.optim.Adam's fresh state."""
    t = p.detach()  # a DTensor under FSDP2 (sharded like its parameter), as torch.optim keeps it
    if kind == "sgd":
        st["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.preserve_format)
    else:
        st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def update_of(kind: str, group: dict, step: float = 1.0, decoupled: bool = False) -> UpdateScalars:
    """The folded update of one group (and, for Adam, one step count)."""
    from ..constants import OPT_ADAM

    if kind == "sgd":
        return UpdateScalars(OPT_SGD, lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"])
    beta1, beta2 = group["betas"]
    return UpdateScalars(OPT_ADAM, lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                  eps=group["eps"], step=step, decoupled=decoupled)


def restore_(p: Tensor, m: Tensor, rho: float, inv: Tensor) -> None:
    """``w = w + rho * inv * m`` (one parameter back from its perturbation)."""
    t = local(p).detach()
    dt = _math_dtype(t)
    t.copy_(t.to(dt) + (inv.to(dt) * rho) * m.to(dt))


def perturb_(p: Tensor, m: Tensor, rho: float, inv: Tensor) -> None:
    """``w = w - rho * inv * m``."""
    t = local(p).detach()
    dt = _math_dtype(t)
    t.copy_(t.to(dt) - (inv.to(dt) * rho) * m.to(dt))


def update_(kind: str, u: UpdateScalars, p: Tensor, st: dict, restore: bool, rho: float, inv: Tensor,
            inv_scale: Tensor | None) -> Tensor:
    """The first pass on one parameter (see the module docstring); returns the sum of squares of
    its new first moment (as stored), an fp64 0-dim tensor."""
    t = local(p).detach()
    dt = _math_dtype(t)
    (sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
     bc2) = u.scalars()
    w = t.to(dt)
    x = local(p.grad).to(dt)
    if inv_scale is not None:
        x = x * inv_scale.reshape(()).to(dt)
    d = x * sign + w * l2
    m_t = first_moment(kind, st)
    m = m_t.to(dt)
    if restore:
        w = w + (inv.to(dt) * rho) * m
    if kind == "sgd":
        m = m * keep + d * coef
        w = w - m * lr
    else:
        v_t = st["exp_avg_sq"]
        v = v_t.to(dt)
        m = m + (d - m) * one_minus_beta1
        v = v * beta2 + d * d * one_minus_beta2
        w = w - (m / (v.sqrt() / bc2 + eps)) * step_size
        w = w * decay
        v_t.copy_(v)
    m_t.copy_(m)
    t.copy_(w)
    return m_t.to(torch.float64).square().sum()


def next_inv(sq: Tensor, inv: Tensor, found_inf: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``1 / (sqrt(sq) + 1e-12)`` in fp32 (``sq`` fp64); 0 when the norm is not finite (an inf or
    NaN gradient without AMP: no parameter is perturbed, so the non-finite values stay where the
    base optimizer put them instead of reaching every weight through the norm); ``inv`` itself
    when AMP found an inf."""
    norm = sq.sqrt().to(torch.float32)
    new = torch.where(torch.isfinite(norm), torch.reciprocal(norm + NORM_EPS), torch.zeros_like(norm))
    if found_inf is not None:
        new = torch.where(found_inf.reshape(()) != 0, inv.reshape(()), new)
    if out is None:
        return new
    out.copy_(new)
    return out


class MomentumPass:
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
    certain), and the :class:`MomentumPass` skeleton."""
    state = opt.base_optimizer.state
    prepare = getattr(backend, "msam_prepare", None)
    make = prepare(kind, plan) if prepare is not None else None
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
    return make, MomentumPass(ref, stale, skip_on_device)


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
    decoupled = isinstance(opt.base_optimizer, torch.optim.AdamW)
    for group, p in work.stale:
        restore_(p, local(first_moment(kind, state[p])), rho_of[id(group)], inv)
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
        u = update_of(kind, group, step, group.get("decoupled_weight_decay", decoupled))
        s = update_(kind, u, p, _local_state(st), id(p) in perturbed, rho_of[id(group)], inv, inv_scale)
        extra = s if extra is None else extra + s
    sq = backend.msam_update(launches, inv, inv_next, amp, extra, plan.locals[0].device)
    if reduce is not None:
        reduce(sq)
        next_inv(sq, inv, None if amp is None else amp[1], out=inv_next)
    for bucket, _, _ in launches:
        backend.msam_perturb(bucket, inv_next, amp)
    for group, p in work.ref:  # never with a device-side skip (skip_on_device excludes them)
        perturb_(p, local(first_moment(kind, state[p])), group["rho"], inv_next)
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

