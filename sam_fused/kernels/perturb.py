"""Perturb with backup, one pass: read w and g, write the backup of w and w + e.

    scale = rho / (norm + 1e-12)     (0 when norm is not finite: weights are left untouched),
                                     times inv_scale with AMP (the gradient is read scaled)
    e     = T^2 * g * scale          T = |w| + eta (ASAM), T = 1 (SAM)

``norm`` is read from the device tensor the norm kernels wrote; rho and eta are runtime arguments,
so a schedule on rho never recompiles. Bytes per element (fp32): read w, g; write backup, w: 16 B.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .table import BLOCK, CHUNK, COL_BACKUP, COL_GRAD, COL_PARAM, NCOL, NORM_EPS, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column, load, store, to_dtype, walk, nothing


@triton.jit
def _perturb_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, b, ok, scale, eta = args
    DTYPE: tl.constexpr = C[0]
    ADAPTIVE: tl.constexpr = C[1]
    raw = load(p, idx, mask, MASKED)
    store(b, idx, raw, mask, MASKED)
    w = raw.to(tl.float32)
    x = load(g, idx, mask, MASKED).to(tl.float32)
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
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, AMP: tl.constexpr, ALIGNED: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    b = column(row, COL_BACKUP, DTYPE, ALIGNED)
    norm = tl.load(norm_ptr)
    ok = norm < float("inf")  # False for inf and NaN
    scale = tl.where(ok, rho / (norm + NORM_EPS), 0.0)
    if AMP:
        scale = scale * tl.load(inv_scale_ptr)
    walk(start, end, _perturb_block, (p, g, b, ok, scale, eta), (DTYPE, ADAPTIVE), nothing(), BLOCK)


def perturb(table: PointerTable, norm: Tensor, dtype, rho: float, adaptive: bool, eta: float,
            inv_scale: Tensor | None = None) -> None:
    if table.n_chunks == 0:
        return
    _perturb_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, norm, float(rho), float(eta), norm if inv_scale is None else inv_scale,
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), AMP=inv_scale is not None, ALIGNED=table.aligned,
        num_warps=NUM_WARPS,
    )
