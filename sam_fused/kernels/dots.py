"""The three sums GSAM and LookSAM need after their second backward, in one read of each array.

    dots = [sum g.g, sum g.aux, sum aux.aux]      over every tensor of every bucket

``g`` is the gradient (times AMP's ``inv_scale`` when given), ``aux`` the buffer in the table's aux
column (GSAM's saved first gradient, LookSAM's g_v). Same scheme as the norm (``norm.py``): a
persistent grid per bucket writes three partials per program (``partials[3k + j]``), one program
sums them in a fixed order, so the same inputs give the same bits on every run.

Bytes per element (fp32): read g, aux: 8 B.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .table import COL_AUX, COL_GRAD, NCOL, TL_DTYPES, PointerTable, chunk_of, column, load, walk_all


@triton.jit
def _dots_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    g, a, grad_mul = args
    AMP: tl.constexpr = C[0]
    x = load(g, idx, mask, MASKED).to(tl.float32)
    if AMP:
        x = x * grad_mul
    y = load(a, idx, mask, MASKED).to(tl.float32)
    gg, ga, aa = acc
    return gg + x * x, ga + x * y, aa + y * y


@triton.jit
def _dots_partials_kernel(
    chunks, tensors, partials, n_chunks, inv_scale_ptr,
    DTYPE: tl.constexpr, AMP: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    grad_mul = 1.0
    if AMP:
        grad_mul = tl.load(inv_scale_ptr)
    n_programs = tl.num_programs(0)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    acc = (zero, zero, zero)
    zero_t = tl.zeros([TAIL], dtype=tl.float32)
    acc_t = (zero_t, zero_t, zero_t)
    for c in range(pid, n_chunks, n_programs):
        row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
        g = column(row, COL_GRAD, DTYPE, ALIGNED)
        a = column(row, COL_AUX, DTYPE, ALIGNED)
        acc, acc_t = walk_all(start, end, _dots_block, (g, a, grad_mul), (AMP,), acc, acc_t, BLOCK, TAIL, STAGES)
    gg, ga, aa = acc
    if TAIL == BLOCK:  # the tails went into acc
        tl.store(partials + 3 * pid, tl.sum(gg, axis=0))
        tl.store(partials + 3 * pid + 1, tl.sum(ga, axis=0))
        tl.store(partials + 3 * pid + 2, tl.sum(aa, axis=0))
    else:
        tg, ta, tb = acc_t
        tl.store(partials + 3 * pid, tl.sum(gg, axis=0) + tl.sum(tg, axis=0))
        tl.store(partials + 3 * pid + 1, tl.sum(ga, axis=0) + tl.sum(ta, axis=0))
        tl.store(partials + 3 * pid + 2, tl.sum(aa, axis=0) + tl.sum(tb, axis=0))


@triton.jit
def _finalize_dots_kernel(partials, n, out, PBLOCK: tl.constexpr):
    offs = tl.arange(0, PBLOCK)
    mask = offs < n
    for j in tl.static_range(3):
        x = tl.load(partials + 3 * offs + j, mask=mask, other=0.0)
        tl.store(out + j, tl.sum(x, axis=0))


def dots_programs(table: PointerTable) -> int:
    """Programs of a bucket's launch: each writes three partials."""
    return launch.for_table(table, "dots")[1] if table.n_chunks else 0


def dots_partials(table: PointerTable, partials: Tensor, dtype, inv_scale: Tensor | None = None) -> None:
    """Write ``3 * dots_programs(table)`` partial sums into ``partials[0:...]``."""
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "dots")
    _dots_partials_kernel[(grid,)](
        table.chunks, table.tensors, partials, table.n_chunks * cfg.split, partials if inv_scale is None else inv_scale,
        DTYPE=TL_DTYPES[dtype], AMP=inv_scale is not None, ALIGNED=table.aligned, **cfg.kwargs(),
    )


def finalize_dots(partials: Tensor, n: int, out: Tensor) -> None:
    """``out[j] = sum over k < n of partials[3k + j]``, one program, fixed order."""
    _finalize_dots_kernel[(1,)](partials, n, out, PBLOCK=max(triton.next_power_of_2(n), 16))
