"""Restore fused with the base-optimizer update, one pass per element.

The table's source column holds the backup of each perturbed parameter (or the parameter itself
when it was not perturbed); the kernel reads it, so the restore costs no pass of its own.

    OPT_RESTORE: w = src                                         R src; W w          (8 B fp32)
    OPT_SGD:     torch.optim.SGD, momentum buffer in column 4    R src, g, m; W w, m (20 B)
    OPT_ADAM:    torch.optim.Adam/AdamW, exp_avg in column 4,    R src, g, m, v;
                 exp_avg_sq in column 5                          W w, m, v           (28 B)

Math in fp32, stored in the parameter's dtype, same formulas and state as ``torch.optim``. The
scalars come folded from the host (``update_scalars.UpdateScalars.scalars()``, shared with the C++ kernels):
maximize, decoupled weight decay and the first momentum step are values, not branches, so a
scheduler that changes any hyperparameter never recompiles; only the update kind, momentum on or
off and nesterov are compile-time constants.

Mixed precision (AMP): with a device-side ``inv_scale`` and ``found_inf`` (as torch's fused
optimizers take them) the gradient is multiplied by inv_scale as it is read, and when found_inf
is non-zero the pass only restores: the weights get their source's bits, the state its own.

GSAM and LookSAM (COMBINE 1 or 2): the gradient read is ``c0 * g + c1 * aux`` (g unscaled first,
aux from the table's aux column, ``(c0, c1, c2, c3)`` read from a device row computed from the dot
products, so no host sync), and with COMBINE 2 the aux column is rewritten to ``c2 * g + c3 * aux``
(LookSAM's g_v): +4 B read (+4 B written) per element.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import constants
from ..update_scalars import UpdateScalars
from . import launch
from .table import (COL_AUX, COL_BACKUP, COL_GRAD, COL_PARAM, COL_STATE1, COL_STATE2, NCOL, OPT_RESTORE, OPT_SGD,
                    TL_DTYPES, PointerTable, chunk_of, column, load, nothing, store, to_dtype, walk_all)


@triton.jit
def _update_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    (p, g, src, s1, s2, ax, skip, sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2,
     eps, step_size, bias_correction2_sqrt, grad_mul, c0, c1, c2, c3) = args
    DTYPE: tl.constexpr = C[0]
    OPT: tl.constexpr = C[1]
    HAS_MOMENTUM: tl.constexpr = C[2]
    NESTEROV: tl.constexpr = C[3]
    AMP: tl.constexpr = C[4]
    COMBINE: tl.constexpr = C[5]
    raw = load(src, idx, mask, MASKED)
    if OPT == OPT_RESTORE:  # a bit copy
        store(p, idx, raw, mask, MASKED)
    else:
        w = raw.to(tl.float32)
        x = load(g, idx, mask, MASKED).to(tl.float32)
        if COMBINE != 0:
            old_aux = load(ax, idx, mask, MASKED)
            a = old_aux.to(tl.float32)
            x = x * grad_mul
            if COMBINE == 2:
                new_aux = to_dtype(c2 * x + c3 * a, DTYPE)
                if AMP:
                    new_aux = tl.where(skip, old_aux, new_aux)
                store(ax, idx, new_aux, mask, MASKED)
            x = c0 * x + c1 * a
        d = x * sign + l2 * w
        if OPT == OPT_SGD:
            if HAS_MOMENTUM:
                old1 = load(s1, idx, mask, MASKED)
                buf = old1.to(tl.float32) * keep + coef * d
                new1 = to_dtype(buf, DTYPE)
                if AMP:
                    new1 = tl.where(skip, old1, new1)
                store(s1, idx, new1, mask, MASKED)
                if NESTEROV:
                    d = d + momentum * buf
                else:
                    d = buf
            w = w - lr * d
        else:  # OPT_ADAM
            w = w * decay
            old1 = load(s1, idx, mask, MASKED)
            old2 = load(s2, idx, mask, MASKED)
            m = old1.to(tl.float32)
            v = old2.to(tl.float32)
            m = m + one_minus_beta1 * (d - m)
            v = v * beta2 + one_minus_beta2 * d * d
            new1 = to_dtype(m, DTYPE)
            new2 = to_dtype(v, DTYPE)
            if AMP:
                new1 = tl.where(skip, old1, new1)
                new2 = tl.where(skip, old2, new2)
            store(s1, idx, new1, mask, MASKED)
            store(s2, idx, new2, mask, MASKED)
            w = w - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
        out = to_dtype(w, DTYPE)
        if AMP:
            out = tl.where(skip, raw, out)
        store(p, idx, out, mask, MASKED)
    return acc


@triton.jit
def _update_chunk(chunks, tensors, c, coef_ptr, scalars, DTYPE: tl.constexpr, OPT: tl.constexpr,
                  HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMP: tl.constexpr, COMBINE: tl.constexpr,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
                  STAGES: tl.constexpr):
    row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    src = column(row, COL_BACKUP, DTYPE, ALIGNED)
    s1 = column(row, COL_STATE1, DTYPE, ALIGNED)
    s2 = column(row, COL_STATE2, DTYPE, ALIGNED)
    ax = p
    if COMBINE != 0:
        ax = column(row, COL_AUX, DTYPE, ALIGNED)
    walk_all(start, end, _update_block, (p, g, src, s1, s2, ax) + scalars, (DTYPE, OPT, HAS_MOMENTUM, NESTEROV, AMP, COMBINE),
         nothing(), nothing(), BLOCK, TAIL, STAGES)


@triton.jit
def _restore_update_kernel(
    chunks, tensors, n_chunks, inv_scale_ptr, found_inf_ptr, coef_ptr,
    sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
    bias_correction2_sqrt,
    DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMP: tl.constexpr,
    COMBINE: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    grad_mul = 1.0
    c0 = 1.0
    c1 = 0.0
    c2 = 0.0
    c3 = 0.0
    if COMBINE != 0:
        c0 = tl.load(coef_ptr)
        c1 = tl.load(coef_ptr + 1)
        c2 = tl.load(coef_ptr + 2)
        c3 = tl.load(coef_ptr + 3)
    if AMP:  # the gradient is read unscaled; an inf/NaN found turns the pass into a restore
        if COMBINE != 0:
            grad_mul = tl.load(inv_scale_ptr)
        else:
            sign = sign * tl.load(inv_scale_ptr)
        skip = tl.load(found_inf_ptr) != 0.0
    else:
        skip = False
    scalars = (skip, sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
               bias_correction2_sqrt, grad_mul, c0, c1, c2, c3)
    if PERSISTENT:
        for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            _update_chunk(chunks, tensors, c, coef_ptr, scalars, DTYPE, OPT, HAS_MOMENTUM, NESTEROV, AMP, COMBINE,
                          ALIGNED, CHUNK, BLOCK, TAIL, STAGES)
    else:
        _update_chunk(chunks, tensors, tl.program_id(0).to(tl.int64), coef_ptr, scalars, DTYPE, OPT, HAS_MOMENTUM,
                      NESTEROV, AMP, COMBINE, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


def restore_update(table: PointerTable, dtype, u: UpdateScalars, amp=None, coef=None, combine: int = 0) -> None:
    """One launch over the table with the folded scalars of ``u``; ``amp`` = (inv_scale, found_inf)
    or None; ``combine`` 1 or 2 with ``coef`` (4 fp32 values on the device) for GSAM / LookSAM."""
    if table.n_chunks == 0:
        return
    inv_scale, found_inf = amp if amp is not None else (table.tensors, table.tensors)
    combine = combine if u.opt != constants.OPT_RESTORE else 0
    cfg, grid = launch.for_table(table, "update")
    _restore_update_kernel[(grid,)](
        table.chunks, table.tensors, table.n_chunks * cfg.split, inv_scale, found_inf,
        table.tensors if coef is None else coef, *u.scalars(),
        DTYPE=TL_DTYPES[dtype], OPT=u.opt, HAS_MOMENTUM=u.momentum != 0, NESTEROV=bool(u.nesterov),
        AMP=amp is not None, COMBINE=combine, ALIGNED=table.aligned, PERSISTENT=cfg.persistent, **cfg.kwargs(),
    )
