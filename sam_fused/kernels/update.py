"""Restore fused with the base-optimizer update, one pass per element.

The table's source column holds the backup of each perturbed parameter (or the parameter itself
when it was not perturbed); the kernel reads it, so the restore costs no pass of its own.

    OPT_RESTORE: w = src                                         R src; W w          (8 B fp32)
    OPT_SGD:     torch.optim.SGD, momentum buffer in column 4    R src, g, m; W w, m (20 B)
    OPT_ADAM:    torch.optim.Adam/AdamW, exp_avg in column 4,    R src, g, m, v;
                 exp_avg_sq in column 5                          W w, m, v           (28 B)

Math in fp32, stored in the parameter's dtype, same formulas and state as ``torch.optim``. Every
value a scheduler changes (lr, weight_decay, momentum, betas) is a runtime argument; the switches
(nesterov, maximize, decoupled decay, first momentum step) are compile-time constants.

Mixed precision (AMP): with a device-side ``inv_scale`` and ``found_inf`` (as torch's fused
optimizers take them) the gradient is multiplied by inv_scale as it is read, and when found_inf
is non-zero the pass only restores: the weights get their source's bits, the state its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..spec import Update
from .table import (COL_BACKUP, COL_GRAD, COL_PARAM, COL_STATE1, COL_STATE2, NCOL, NUM_WARPS, TL_DTYPES, BLOCK, CHUNK,
                    PointerTable, chunk_of, column, load, nothing, store, to_dtype, walk)


@triton.jit
def _update_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    (p, g, src, s1, s2, skip, inv_scale, lr, weight_decay, momentum, one_minus_dampening, one_minus_beta1, beta2,
     one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay) = args
    DTYPE: tl.constexpr = C[0]
    OPT: tl.constexpr = C[1]
    HAS_MOMENTUM: tl.constexpr = C[2]
    FIRST: tl.constexpr = C[3]
    NESTEROV: tl.constexpr = C[4]
    MAXIMIZE: tl.constexpr = C[5]
    DECOUPLED: tl.constexpr = C[6]
    AMP: tl.constexpr = C[7]
    raw = load(src, idx, mask, MASKED)
    if OPT == 0:  # spec.OPT_RESTORE: a bit copy
        store(p, idx, raw, mask, MASKED)
    else:
        w = raw.to(tl.float32)
        d = load(g, idx, mask, MASKED).to(tl.float32)
        if AMP:
            d = d * inv_scale
        if MAXIMIZE:
            d = -d
        if OPT == 1:  # spec.OPT_SGD
            d = d + weight_decay * w
            if HAS_MOMENTUM:
                if FIRST:  # the buffer starts at d; a skipped first step leaves it zero
                    buf = d
                    new1 = to_dtype(tl.where(skip, 0.0, buf), DTYPE)
                else:
                    old1 = load(s1, idx, mask, MASKED)
                    buf = old1.to(tl.float32) * momentum + one_minus_dampening * d
                    new1 = to_dtype(buf, DTYPE)
                    if AMP:
                        new1 = tl.where(skip, old1, new1)
                store(s1, idx, new1, mask, MASKED)
                if NESTEROV:
                    d = d + momentum * buf
                else:
                    d = buf
            w = w - lr * d
        else:  # spec.OPT_ADAM
            if DECOUPLED:
                w = w * decay
            else:
                d = d + weight_decay * w
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
def _restore_update_kernel(
    chunks, tensors, inv_scale_ptr, found_inf_ptr,
    lr, weight_decay, momentum, one_minus_dampening,
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay,
    DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, AMP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    src = column(row, COL_BACKUP, DTYPE, ALIGNED)
    s1 = column(row, COL_STATE1, DTYPE, ALIGNED)
    s2 = column(row, COL_STATE2, DTYPE, ALIGNED)
    if AMP:
        inv_scale = tl.load(inv_scale_ptr)
        skip = tl.load(found_inf_ptr) != 0.0
    else:
        inv_scale = 1.0
        skip = False
    args = (p, g, src, s1, s2, skip, inv_scale, lr, weight_decay, momentum, one_minus_dampening, one_minus_beta1,
            beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay)
    walk(start, end, _update_block, args, (DTYPE, OPT, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, DECOUPLED, AMP),
         nothing(), BLOCK)


def restore_update(table: PointerTable, dtype, u: Update, amp=None) -> None:
    """One launch over the table with the scalars of ``u``; ``amp`` = (inv_scale, found_inf) or None."""
    if table.n_chunks == 0:
        return
    inv_scale, found_inf = amp if amp is not None else (table.tensors, table.tensors)
    _restore_update_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, inv_scale, found_inf,
        float(u.lr), float(u.weight_decay), float(u.momentum), 1.0 - float(u.dampening),
        1.0 - float(u.beta1), float(u.beta2), 1.0 - float(u.beta2), float(u.eps),
        float(u.step_size), float(u.bias_correction2_sqrt), float(u.decay),
        DTYPE=TL_DTYPES[dtype], OPT=u.opt, HAS_MOMENTUM=u.momentum != 0, FIRST=bool(u.first),
        NESTEROV=bool(u.nesterov), MAXIMIZE=bool(u.maximize), DECOUPLED=bool(u.decoupled), AMP=amp is not None,
        ALIGNED=table.aligned, num_warps=NUM_WARPS,
    )
