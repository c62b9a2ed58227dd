"""Global gradient norm, deterministic, without float atomics.

Stage 1 (one launch per bucket): a persistent grid of at most ``NORM_PROGRAMS`` programs; program
``k`` walks chunks k, k + G, k + 2G, ... of the bucket's table, accumulates ``(T * g)^2`` in an fp32
vector and writes its sum to ``partials[k]``. ``T = |w| + eta`` for ASAM, 1 for SAM.
Stage 2 (one launch per step): one program sums the partials of every bucket and writes the norm.

Bytes per element: SAM reads g (4 B fp32); ASAM reads g and w (8 B). The order of every addition
is fixed by the table and the grid, so the same gradients give the same bits on every run.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .table import (BLOCK, CHUNK, NORM_PROGRAMS, NUM_WARPS, TL_DTYPES, PointerTable, chunk_of, column,
                    full_block, load)


@triton.jit
def _sq_block(p, g, idx, mask, eta, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    x = load(g, idx, mask, MASKED).to(tl.float32)
    if ADAPTIVE:
        w = load(p, idx, mask, MASKED).to(tl.float32)
        x = x * (tl.abs(w) + eta)
    return x * x


@triton.jit
def _sq_partials_kernel(
    chunks, tensors, partials, n_chunks, eta,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(pid, n_chunks, n_programs):
        row, start, end = chunk_of(chunks, tensors, c, CHUNK)
        p = column(row, 1, DTYPE, ALIGNED)
        g = column(row, 2, DTYPE, ALIGNED)
        n_full = (end - start) // BLOCK
        for k in range(0, n_full):
            idx = full_block(start, k, BLOCK)
            acc += _sq_block(p, g, idx, idx, eta, ADAPTIVE, False)
        tail = start + n_full * BLOCK
        if tail < end:
            idx = tail + tl.arange(0, BLOCK)
            acc += _sq_block(p, g, idx, idx < end, eta, ADAPTIVE, True)
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def _finalize_kernel(partials, n, norm, PBLOCK: tl.constexpr):
    offs = tl.arange(0, PBLOCK)
    x = tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(norm, tl.sqrt(tl.sum(x, axis=0)))


def norm_programs(table: PointerTable) -> int:
    """Partial sums a bucket writes: one per program of its norm launch."""
    return min(table.n_chunks, NORM_PROGRAMS)


def sq_partials(table: PointerTable, partials: Tensor, dtype, adaptive: bool, eta: float) -> None:
    """Write ``norm_programs(table)`` partial sums of squares into ``partials[0:...]``."""
    grid = norm_programs(table)
    if grid == 0:
        return
    _sq_partials_kernel[(grid,)](
        table.chunks, table.tensors, partials, table.n_chunks, float(eta),
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), ALIGNED=table.aligned, CHUNK=CHUNK, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def finalize(partials: Tensor, n: int, norm: Tensor) -> None:
    """``norm = sqrt(sum(partials[:n]))`` in one program, fixed order."""
    _finalize_kernel[(1,)](partials, n, norm, PBLOCK=max(triton.next_power_of_2(n), 16))
