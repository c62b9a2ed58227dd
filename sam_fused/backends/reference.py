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
from ..constants import NORM_EPS
from ..distributed import local
from ..plan import StepPlan
from ..update_scalars import UpdateScalars
from .amp import Amp
from .base import Backend, Combo, base_step
from .optim_state import check_all_state, check_state


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


def preconditioner(group: dict, st: dict | None, dt: torch.dtype) -> Tensor | None:
    """``1 / (sqrt(v_hat) + eps)`` of Adam's state ``st`` after its last update (``v_hat =
    exp_avg_sq / (1 - beta2^step)``, the denominator Adam's own step divides by; the group's beta2
    and eps), in ``dt``; None before the parameter's first update (no second moment yet: the
    identity, so that step is SAM's)."""
    if not st or "exp_avg_sq" not in st or float(st["step"]) == 0.0:
        return None
    bc2 = 1.0 - group["betas"][1] ** float(st["step"])
    v = local(st["exp_avg_sq"]).to(dt)
    return torch.reciprocal(v.sqrt() / bc2**0.5 + group["eps"])


def _precondition_triples(plan: StepPlan):
    """(group, parameter as written, its gradient, its backup, the parameter keying the state) of
    every parameter of a perturbing plan, buckets and the rest alike."""
    for b in plan.buckets:
        yield from ((b.group, p, g, backup, owner) for p, g, backup, owner in zip(b.params, b.grads(), b.backups,
                                                                                 b.owners))
    for group, p, backup in plan.slow:
        yield group, local(p), local(p.grad), backup, p


def precondition_perturb(state, plan: StepPlan, reduce_sq=None, inv_scale: Tensor | None = None) -> Tensor:
    """The preconditioned perturbation, over every parameter of ``plan`` (``state``: the Adam base
    optimizer's): with ``P^-1 = preconditioner(...)`` (1 where None),

        norm = || P^-1 g ||_2   (fp64 sum of squares, ``reduce_sq`` in place, then fp32)
        e    = rho * P^-1 g / (norm + 1e-12),   backup = w,   w <- w + e   (untouched when not finite)

    so that ``||e|| = rho`` as SAM's, along the direction Adam's own step would take with ``g``.
    Returns the norm."""
    triples = list(_precondition_triples(plan))
    for _, _, _, _, owner in triples:  # the state read below fits its parameter (raises before any write)
        if state.get(owner):
            check_state("adam", owner, state[owner])
    device = plan.locals[0].device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for group, p, g, _, owner in triples:
        x = _unscaled(g.to(torch.float64), inv_scale)
        inv_p = preconditioner(group, state.get(owner), torch.float64)
        if inv_p is not None:
            x = x * inv_p
        sq += x.square().sum().to(device)
    if reduce_sq is not None:
        reduce_sq(sq)
    norm = sq.sqrt().float()
    for group, p, g, backup, owner in triples:
        backup.copy_(p.detach())
        dt = _math_dtype(p)
        n = norm.to(device=p.device, dtype=dt)
        ok = torch.isfinite(n)
        scale = torch.where(ok, group["rho"] / (n + EPS), torch.zeros_like(n))
        w = p.detach().to(dt)
        x = _unscaled(g.to(dt), inv_scale)
        inv_p = preconditioner(group, state.get(owner), dt)
        e = (x if inv_p is None else x * inv_p) * scale
        p.detach().copy_(torch.where(ok, w + e, w))
    return norm


class TorchBackend(Backend):
    """Pure-PyTorch reference: one op per tensor, the base optimizer's own ``step()`` for the update.
    Every parameter takes the reference ops (``dtypes`` is empty: the plan puts all in ``slow``)."""

    name = "torch"

    def perturb(self, plan: StepPlan, reduce_sq=None, inv_scale=None, save=None, precondition=None) -> Tensor:
        if precondition is not None:
            return precondition_perturb(precondition, plan, reduce_sq, inv_scale)
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

    def msam_update(self, launches, inv: Tensor, inv_next: Tensor, amp: Amp | None, extra: Tensor | None,
                    device: torch.device) -> Tensor:
        """No launches here: the reference ops did every parameter and summed ``extra``."""
        return msam_sum(extra, inv, inv_next, amp, device)


# ---------------------------------------------------------------------------------------------
# Momentum-SAM (optim/msam.py holds the order of its step; the kernels: kernels/msam.py)
MSAM_RULES = """Momentum-SAM's step over a plan: the reference ops (the oracle) and the order every backend follows.

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
back (``w + r m``) and stays there until it has one."""


def msam_moment(kind: str, st: dict) -> Tensor:
    """The buffer Momentum-SAM perturbs along: SGD's momentum buffer, Adam's exp_avg."""
    return st["momentum_buffer" if kind == "sgd" else "exp_avg"]

def msam_restore_(p: Tensor, m: Tensor, rho: float, inv: Tensor) -> None:
    """``w = w + rho * inv * m`` (one parameter back from its perturbation)."""
    t = local(p).detach()
    dt = _math_dtype(t)
    t.copy_(t.to(dt) + (inv.to(dt) * rho) * m.to(dt))

def msam_perturb_(p: Tensor, m: Tensor, rho: float, inv: Tensor) -> None:
    """``w = w - rho * inv * m``."""
    t = local(p).detach()
    dt = _math_dtype(t)
    t.copy_(t.to(dt) - (inv.to(dt) * rho) * m.to(dt))

def msam_update_(kind: str, u: UpdateScalars, p: Tensor, st: dict, restore: bool, rho: float, inv: Tensor,
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
    m_t = msam_moment(kind, st)
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

def msam_next_inv(sq: Tensor, inv: Tensor, found_inf: Tensor | None, out: Tensor | None = None) -> Tensor:
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


def msam_sum(extra: Tensor | None, inv: Tensor, inv_next: Tensor, amp: Amp | None, device: torch.device) -> Tensor:
    """The sum of squares of the reference ops (``extra``; zero when none ran) and ``inv_next`` from it."""
    sq = extra if extra is not None else torch.zeros((), dtype=torch.float64, device=device)
    msam_next_inv(sq, inv, None if amp is None else amp[1], out=inv_next)
    return sq
