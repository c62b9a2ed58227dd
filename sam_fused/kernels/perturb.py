"""Perturb with backup, one pass: read w and g, write the backup of w and w + e.

    scale = rho / (norm + 1e-12)     (0 when norm is not finite: weights are left untouched),
                                     times inv_scale with AMP (the gradient is read scaled)
    e     = T^2 * g * scale          T = |w| + eta (ASAM), T = 1 (SAM)

``norm`` is read from the device tensor the norm kernels wrote; rho and eta are runtime arguments,
so a schedule on rho never recompiles. Bytes per element (fp32): read w, g; write backup, w: 16 B.
With SAVE (GSAM, LookSAM), the unscaled gradient is also written to the aux column: 20 B; with a
non-finite norm nothing is written there (the saved buffer keeps its bits, as the weights do).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .table import BLOCK, CHUNK, COL_AUX, COL_BACKUP, COL_GRAD, COL_PARAM, NCOL, NORM_EPS, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column, load, store, to_dtype, walk, nothing


@triton.jit
def _perturb_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, b, sv, ok, scale, eta, grad_mul = args
    DTYPE: tl.constexpr = C[0]
    ADAPTIVE: tl.constexpr = C[1]
    SAVE: tl.constexpr = C[2]
    AMP: tl.constexpr = C[3]
    raw = load(p, idx, mask, MASKED)
    store(b, idx, raw, mask, MASKED)
    w = raw.to(tl.float32)
    graw = load(g, idx, mask, MASKED)
    x = graw.to(tl.float32)
    if SAVE:
        if ok:  # uniform over the launch: a branch, not a mask
            if AMP:
                store(sv, idx, to_dtype(x * grad_mul, DTYPE), mask, MASKED)
            else:
                store(sv, idx, graw, mask, MASKED)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        e = t * t * x * scale
    else:
        e = x * scale
    store(p, idx, tl.where(ok, to_dtype(w + e, DTYPE), raw), mask, MASKED)
    return acc


@triton.jit
def _perturb_kernel(
    chunks, tensors, norm_ptr, rho, eta, inv_scale_ptr,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, AMP: tl.constexpr, SAVE: tl.constexpr, ALIGNED: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    b = column(row, COL_BACKUP, DTYPE, ALIGNED)
    sv = p
    if SAVE:
        sv = column(row, COL_AUX, DTYPE, ALIGNED)
    norm = tl.load(norm_ptr)
    ok = norm < float("inf")  # False for inf and NaN
    scale = tl.where(ok, rho / (norm + NORM_EPS), 0.0)
    grad_mul = 1.0
    if AMP:
        grad_mul = tl.load(inv_scale_ptr)
        scale = scale * grad_mul
    walk(start, end, _perturb_block, (p, g, b, sv, ok, scale, eta, grad_mul), (DTYPE, ADAPTIVE, SAVE, AMP), nothing(),
         BLOCK)


def perturb(table: PointerTable, norm: Tensor, dtype, rho: float, adaptive: bool, eta: float,
            inv_scale: Tensor | None = None, save: bool = False) -> None:
    """One launch over the table; with ``save`` the aux column receives the unscaled gradient."""
    if table.n_chunks == 0:
        return
    _perturb_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, norm, float(rho), float(eta), norm if inv_scale is None else inv_scale,
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), AMP=inv_scale is not None, SAVE=bool(save),
        ALIGNED=table.aligned, num_warps=NUM_WARPS,
    )
