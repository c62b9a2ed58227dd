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

from .table import BLOCK, CHUNK, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column, to_dtype


@triton.jit
def _perturb_kernel(
    chunks, tensors, norm_ptr, rho, eta,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, end = chunk_of(chunks, tensors, tl.program_id(0).to(tl.int64), CHUNK)
    p = column(row, 1, DTYPE)
    g = column(row, 2, DTYPE)
    b = column(row, 3, DTYPE)
    norm = tl.load(norm_ptr)
    ok = norm < float("inf")  # False for inf and NaN
    scale = tl.where(ok, rho / (norm + 1e-12), 0.0)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        raw = tl.load(p + idx, mask=mask)
        tl.store(b + idx, raw, mask=mask)
        w = raw.to(tl.float32)
        x = tl.load(g + idx, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            t = tl.abs(w) + eta
            e = t * t * x * scale
        else:
            e = x * scale
        tl.store(p + idx, tl.where(ok, to_dtype(w + e, DTYPE), raw), mask=mask)


def perturb(table: PointerTable, norm: Tensor, dtype, rho: float, adaptive: bool, eta: float) -> None:
    if table.n_chunks == 0:
        return
    _perturb_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, norm, float(rho), float(eta),
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
