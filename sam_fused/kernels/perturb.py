"""Perturb with backup, one pass: read w and g, write the backup of w and w + e.

    scale = rho / (norm + 1e-12)     (0 when norm is not finite: weights are left untouched),
                                     times inv_scale with AMP (the gradient is read scaled)
    e     = T^2 * g * scale          T = |w| + eta (ASAM), T = 1 (SAM)
    e     = g * scale / (sqrt(v) / sqrt(1 - beta2^t) + eps)   (PRECOND: Adam's denominator, v its
                                     exp_avg_sq in the state-2 column; +4 B read)

``norm`` is read from the device tensor the norm kernels wrote; rho and eta are runtime arguments,
so a schedule on rho never recompiles. Bytes per element (fp32): read w, g; write backup, w: 16 B.
With SAVE (GSAM, LookSAM), the unscaled gradient is also written to the aux column: 20 B; with a
non-finite norm nothing is written there (the saved buffer keeps its bits, as the weights do).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .table import COL_AUX, COL_BACKUP, COL_GRAD, COL_PARAM, COL_STATE2, NCOL, NORM_EPS, TL_DTYPES, PointerTable, chunk_of, column, load, store, to_dtype, walk_all, nothing


@triton.jit
def _perturb_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, b, sv, v, ok, scale, eta, grad_mul, bc2_inv = args
    DTYPE: tl.constexpr = C[0]
    ADAPTIVE: tl.constexpr = C[1]
    SAVE: tl.constexpr = C[2]
    AMP: tl.constexpr = C[3]
    PRECOND: tl.constexpr = C[4]
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
    elif PRECOND:  # eta holds Adam's eps
        vv = load(v, idx, mask, MASKED).to(tl.float32)
        e = x * scale / (tl.sqrt(vv) * bc2_inv + eta)
    else:
        e = x * scale
    store(p, idx, tl.where(ok, to_dtype(w + e, DTYPE), raw), mask, MASKED)
    return acc


@triton.jit
def _perturb_chunk(chunks, tensors, c, ok, scale, eta, grad_mul, bc2_inv, DTYPE: tl.constexpr,
                   ADAPTIVE: tl.constexpr, AMP: tl.constexpr, SAVE: tl.constexpr, PRECOND: tl.constexpr,
                   ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr):
    row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    g = column(row, COL_GRAD, DTYPE, ALIGNED)
    b = column(row, COL_BACKUP, DTYPE, ALIGNED)
    sv = p
    if SAVE:
        sv = column(row, COL_AUX, DTYPE, ALIGNED)
    v = g
    if PRECOND:
        v = column(row, COL_STATE2, DTYPE, ALIGNED)
    walk_all(start, end, _perturb_block, (p, g, b, sv, v, ok, scale, eta, grad_mul, bc2_inv),
             (DTYPE, ADAPTIVE, SAVE, AMP, PRECOND), nothing(), nothing(), BLOCK, TAIL, STAGES)


@triton.jit
def _perturb_kernel(
    chunks, tensors, n_chunks, norm_ptr, rho, eta, inv_scale_ptr, bc2_inv,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, AMP: tl.constexpr, SAVE: tl.constexpr, PRECOND: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    norm = tl.load(norm_ptr)
    ok = norm < float("inf")  # False for inf and NaN
    scale = tl.where(ok, rho / (norm + NORM_EPS), 0.0)
    grad_mul = 1.0
    if AMP:
        grad_mul = tl.load(inv_scale_ptr)
        scale = scale * grad_mul
    if PERSISTENT:
        for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            _perturb_chunk(chunks, tensors, c, ok, scale, eta, grad_mul, bc2_inv, DTYPE, ADAPTIVE, AMP, SAVE, PRECOND,
                           ALIGNED, CHUNK, BLOCK, TAIL, STAGES)
    else:
        _perturb_chunk(chunks, tensors, tl.program_id(0).to(tl.int64), ok, scale, eta, grad_mul, bc2_inv, DTYPE,
                       ADAPTIVE, AMP, SAVE, PRECOND, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


def perturb(table: PointerTable, norm: Tensor, dtype, rho: float, adaptive: bool, eta: float,
            inv_scale: Tensor | None = None, save: bool = False,
            precondition: tuple[float, float] | None = None) -> None:
    """One launch over the table; with ``save`` the aux column receives the unscaled gradient;
    ``precondition`` = (1 / sqrt(1 - beta2^t), eps) divides by Adam's denominator (not with ASAM)."""
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "perturb")
    _perturb_kernel[(grid,)](
        table.chunks, table.tensors, table.n_chunks * cfg.split, norm, float(rho),
        float(eta if precondition is None else precondition[1]), norm if inv_scale is None else inv_scale,
        1.0 if precondition is None else float(precondition[0]),
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), AMP=inv_scale is not None, SAVE=bool(save),
        PRECOND=precondition is not None,
        ALIGNED=table.aligned, PERSISTENT=cfg.persistent, **cfg.kwargs(),
    )
