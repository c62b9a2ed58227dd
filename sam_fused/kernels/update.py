"""Restore fused with the base-optimizer update, one pass per element.

The table's source column holds the backup of each perturbed parameter (or the parameter itself
when it was not perturbed); the kernel reads it, so the restore costs no pass of its own.

    OPT_RESTORE: w = src                                         R src; W w          (8 B fp32)
    OPT_SGD:     torch.optim.SGD, momentum buffer in column 4    R src, g, m; W w, m (20 B)
    OPT_ADAM:    torch.optim.Adam/AdamW, exp_avg in column 4,    R src, g, m, v;
                 exp_avg_sq in column 5                          W w, m, v           (28 B)

Math in fp32, stored in the parameter's dtype, same formulas and state as ``torch.optim``. The
scalars come folded from the host (``spec.Update.scalars()``, shared with the C++ kernels):
maximize, decoupled weight decay and the first momentum step are values, not branches, so a
scheduler that changes any hyperparameter never recompiles; only the update kind, momentum on or
off and nesterov are compile-time constants.

Mixed precision (AMP): with a device-side ``inv_scale`` and ``found_inf`` (as torch's fused
optimizers take them) the gradient is multiplied by inv_scale as it is read, and when found_inf
is non-zero the pass only restores: the weights get their source's bits, the state its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..spec import Update
from .table import (BLOCK, CHUNK, COL_BACKUP, COL_GRAD, COL_PARAM, COL_STATE1, COL_STATE2, NCOL, NUM_WARPS, OPT_RESTORE,
                    OPT_SGD, TL_DTYPES,
                    PointerTable, chunk_of, column, load, nothing, store, to_dtype, walk)


@triton.jit
def _update_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    (p, g, src, s1, s2, skip, sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2,
     eps, step_size, bias_correction2_sqrt) = args
    DTYPE: tl.constexpr = C[0]
    OPT: tl.constexpr = C[1]
    HAS_MOMENTUM: tl.constexpr = C[2]
    NESTEROV: tl.constexpr = C[3]
    AMP: tl.constexpr = C[4]
    raw = load(src, idx, mask, MASKED)
    if OPT == OPT_RESTORE:  # a bit copy
        store(p, idx, raw, mask, MASKED)
    else:
        w = raw.to(tl.float32)
        d = load(g, idx, mask, MASKED).to(tl.float32) * sign + l2 * w
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
def _restore_update_kernel(
    chunks, tensors, inv_scale_ptr, found_inf_ptr,
    sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
    bias_correction2_sqrt,
    DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    src = column(row, COL_BACKUP, DTYPE, ALIGNED)
    s1 = column(row, COL_STATE1, DTYPE, ALIGNED)
    s2 = column(row, COL_STATE2, DTYPE, ALIGNED)
    if AMP:  # the gradient is read unscaled; an inf/NaN found turns the pass into a restore
        sign = sign * tl.load(inv_scale_ptr)
        skip = tl.load(found_inf_ptr) != 0.0
    else:
        skip = False
    args = (p, g, src, s1, s2, skip, sign, lr, l2, decay, momentum, keep, coef, one_minus_beta1, beta2,
            one_minus_beta2, eps, step_size, bias_correction2_sqrt)
    walk(start, end, _update_block, args, (DTYPE, OPT, HAS_MOMENTUM, NESTEROV, AMP), nothing(), BLOCK)


def restore_update(table: PointerTable, dtype, u: Update, amp=None) -> None:
    """One launch over the table with the folded scalars of ``u``; ``amp`` = (inv_scale, found_inf)
    or None."""
    if table.n_chunks == 0:
        return
    inv_scale, found_inf = amp if amp is not None else (table.tensors, table.tensors)
    _restore_update_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, inv_scale, found_inf, *u.scalars(),
        DTYPE=TL_DTYPES[dtype], OPT=u.opt, HAS_MOMENTUM=u.momentum != 0, NESTEROV=bool(u.nesterov),
        AMP=amp is not None, ALIGNED=table.aligned, num_warps=NUM_WARPS,
    )
