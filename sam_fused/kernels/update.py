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
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..spec import Update
from .table import (BLOCK, CHUNK, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column, full_block, load,
                    store, to_dtype)

@triton.jit
def _update_block(
    p, g, src, s1, s2, idx, mask,
    lr, weight_decay, momentum, one_minus_dampening,
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay,
    DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, MASKED: tl.constexpr,
):
    if OPT == 0:  # spec.OPT_RESTORE: a bit copy
        store(p, idx, load(src, idx, mask, MASKED), mask, MASKED)
    else:
        w = load(src, idx, mask, MASKED).to(tl.float32)
        d = load(g, idx, mask, MASKED).to(tl.float32)
        if MAXIMIZE:
            d = -d
        if OPT == 1:  # spec.OPT_SGD
            d = d + weight_decay * w
            if HAS_MOMENTUM:
                if FIRST:
                    buf = d
                else:
                    buf = load(s1, idx, mask, MASKED).to(tl.float32) * momentum + one_minus_dampening * d
                store(s1, idx, to_dtype(buf, DTYPE), mask, MASKED)
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
            m = load(s1, idx, mask, MASKED).to(tl.float32)
            v = load(s2, idx, mask, MASKED).to(tl.float32)
            m = m + one_minus_beta1 * (d - m)
            v = v * beta2 + one_minus_beta2 * d * d
            store(s1, idx, to_dtype(m, DTYPE), mask, MASKED)
            store(s2, idx, to_dtype(v, DTYPE), mask, MASKED)
            w = w - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
        store(p, idx, to_dtype(w, DTYPE), mask, MASKED)


@triton.jit
def _restore_update_kernel(
    chunks, tensors,
    lr, weight_decay, momentum, one_minus_dampening,
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay,
    DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK)
    p = column(row, 1, DTYPE, ALIGNED)
    g = column(row, 2, DTYPE, ALIGNED)
    src = column(row, 3, DTYPE, ALIGNED)
    s1 = column(row, 4, DTYPE, ALIGNED)
    s2 = column(row, 5, DTYPE, ALIGNED)
    n_full = (end - start) // BLOCK
    for k in range(0, n_full):
        idx = full_block(start, k, BLOCK)
        _update_block(p, g, src, s1, s2, idx, idx, lr, weight_decay, momentum, one_minus_dampening,
                      one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay,
                      DTYPE, OPT, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, DECOUPLED, False)
    tail = start + n_full * BLOCK
    if tail < end:
        idx = tail + tl.arange(0, BLOCK)
        _update_block(p, g, src, s1, s2, idx, idx < end, lr, weight_decay, momentum, one_minus_dampening,
                      one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay,
                      DTYPE, OPT, HAS_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, DECOUPLED, True)


def restore_update(table: PointerTable, dtype, u: Update) -> None:
    """One launch over the table with the scalars of ``u``."""
    if table.n_chunks == 0:
        return
    _restore_update_kernel[(table.n_chunks,)](
        table.chunks, table.tensors,
        float(u.lr), float(u.weight_decay), float(u.momentum), 1.0 - float(u.dampening),
        1.0 - float(u.beta1), float(u.beta2), 1.0 - float(u.beta2), float(u.eps),
        float(u.step_size), float(u.bias_correction2_sqrt), float(u.decay),
        DTYPE=TL_DTYPES[dtype], OPT=u.opt, HAS_MOMENTUM=u.momentum != 0, FIRST=bool(u.first),
        NESTEROV=bool(u.nesterov), MAXIMIZE=bool(u.maximize), DECOUPLED=bool(u.decoupled), ALIGNED=table.aligned,
        CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
