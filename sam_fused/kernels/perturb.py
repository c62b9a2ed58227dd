"""Perturb with backup, one pass: read w and g, write the backup of w and w + e.

    scale = rho / (norm + 1e-12)     (0 when norm is not finite: weights are left untouched)
    e     = T^2 * g * scale          T = |w| + eta (ASAM), T = 1 (SAM)

``norm`` is read from the device tensor the norm kernels wrote; rho and eta are runtime arguments,
so a schedule on rho never recompiles. Bytes per element (fp32): read w, g; write backup, w: 16 B.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .table import (BLOCK, CHUNK, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column, full_block, load,
                    store, to_dtype)


@triton.jit
def _perturb_block(p, g, b, idx, mask, ok, scale, eta, DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
                   MASKED: tl.constexpr):
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


@triton.jit
def _perturb_kernel(
    chunks, tensors, norm_ptr, rho, eta,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK)
    p = column(row, 1, DTYPE, ALIGNED)
    g = column(row, 2, DTYPE, ALIGNED)
    b = column(row, 3, DTYPE, ALIGNED)
    norm = tl.load(norm_ptr)
    ok = norm < float("inf")  # False for inf and NaN
    scale = tl.where(ok, rho / (norm + 1e-12), 0.0)
    n_full = (end - start) // BLOCK
    for k in range(0, n_full):
        idx = full_block(start, k, BLOCK)
        _perturb_block(p, g, b, idx, idx, ok, scale, eta, DTYPE, ADAPTIVE, False)
    tail = start + n_full * BLOCK
    if tail < end:
        idx = tail + tl.arange(0, BLOCK)
        _perturb_block(p, g, b, idx, idx < end, ok, scale, eta, DTYPE, ADAPTIVE, True)


def perturb(table: PointerTable, norm: Tensor, dtype, rho: float, adaptive: bool, eta: float) -> None:
    if table.n_chunks == 0:
        return
    _perturb_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, norm, float(rho), float(eta),
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), ALIGNED=table.aligned, CHUNK=CHUNK, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
