"""Global gradient norm, deterministic, without float atomics.

Stage 1 (one launch per bucket): a persistent grid (512 programs at most by default: ``launch_configs.json``); program
``k`` walks chunks k, k + G, k + 2G, ... of the bucket's table, accumulates ``(T * g)^2`` in an fp64
vector and writes its sum to ``partials[k]`` (fp64). ``T = |w| + eta`` for ASAM, 1 for SAM.
Stage 2 (one launch per step): one program sums the partials of every bucket and writes the sum of
squares (fp64) and its square root (the norm, fp32); a distributed reduction can change the sum in
between and take the root again.

Why fp64: the square of a finite fp32 value reaches 1.2e77 and the sum of squares of gradients
whose norm fits fp32 (up to 3.4e38) reaches 1.2e77 too; in fp32 that sum overflowed for norms
above 1.8e19 (bf16 gradients of 1e20: norm 6.9e20, sum of squares inf, the perturbation silently
skipped). In fp64 every such sum is finite (and squares of tiny gradients do not underflow), so
the norm is finite exactly when the true norm fits fp32. The cost is one conversion and one fp64
FMA per element, far below the memory traffic on every GPU with fp64 at >= 1/64 of the fp32 rate.

With AMP's ``inv_scale`` the gradient is multiplied by it as it is read (a constexpr variant).

Bytes per element: SAM reads g (4 B fp32); ASAM reads g and w (8 B). The order of every addition
is fixed by the table and the grid, so the same gradients give the same bits on every run.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .table import COL_GRAD, COL_PARAM, COL_STATE2, NCOL, TL_DTYPES, PointerTable, chunk_of, column, load, walk_all


@triton.jit
def _sq_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, s = args
    eta, grad_mul = s
    ADAPTIVE: tl.constexpr = C[0]
    AMP: tl.constexpr = C[1]
    x = load(g, idx, mask, MASKED).to(tl.float64)
    if AMP:
        x = x * grad_mul
    if ADAPTIVE:
        w = load(p, idx, mask, MASKED).to(tl.float64)
        x = x * (tl.abs(w) + eta)
    return acc + x * x


@triton.jit
def _sq_pre_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    v, g, s = args
    eps, grad_mul, bc2_inv = s
    AMP: tl.constexpr = C[0]
    x = load(g, idx, mask, MASKED).to(tl.float64)
    if AMP:
        x = x * grad_mul
    vv = load(v, idx, mask, MASKED).to(tl.float64)
    x = x / (tl.sqrt(vv) * bc2_inv + eps)  # Adam's denominator sqrt(v / (1 - beta2^t)) + eps
    return acc + x * x


@triton.jit
def _write_partials(chunks, tensors, partials, n_chunks, block, scalars, C: tl.constexpr, FIRST: tl.constexpr,
                    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    TAIL: tl.constexpr, STAGES: tl.constexpr):
    """``partials[pid]`` = the sum of ``block``'s squares over this program's chunks, ``block``
    reading (the column FIRST, the gradient, ``scalars``)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc_t = tl.zeros([TAIL], dtype=tl.float64)
    for c in range(pid, n_chunks, n_programs):
        row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
        a = column(row, FIRST, DTYPE, ALIGNED)
        g = column(row, COL_GRAD, DTYPE, ALIGNED)
        acc, acc_t = walk_all(start, end, block, (a, g, scalars), C, acc, acc_t, BLOCK, TAIL, STAGES)
    if TAIL == BLOCK:  # the tails went into acc
        tl.store(partials + pid, tl.sum(acc, axis=0))
    else:
        tl.store(partials + pid, tl.sum(acc, axis=0) + tl.sum(acc_t, axis=0))


@triton.jit
def _sq_partials_kernel(
    chunks, tensors, partials, n_chunks, eta, inv_scale_ptr,
    DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, AMP: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr,
):
    grad_mul = 1.0
    if AMP:
        grad_mul = tl.load(inv_scale_ptr).to(tl.float64)
    _write_partials(chunks, tensors, partials, n_chunks, _sq_block, (eta, grad_mul), (ADAPTIVE, AMP), COL_PARAM, DTYPE,
                    ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


@triton.jit
def _sq_pre_partials_kernel(
    chunks, tensors, partials, n_chunks, eps, inv_scale_ptr, bc2_inv,
    DTYPE: tl.constexpr, AMP: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr,
):
    """The preconditioned norm's partial sums: (g / (sqrt(v) * bc2_inv + eps))^2, v the state-2 column."""
    grad_mul = 1.0
    if AMP:
        grad_mul = tl.load(inv_scale_ptr).to(tl.float64)
    _write_partials(chunks, tensors, partials, n_chunks, _sq_pre_block, (eps, grad_mul, bc2_inv), (AMP,), COL_STATE2,
                    DTYPE, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


@triton.jit
def _finalize_kernel(partials, n, sq, norm, PBLOCK: tl.constexpr):
    offs = tl.arange(0, PBLOCK)
    x = tl.load(partials + offs, mask=offs < n, other=0.0)
    total = tl.sum(x, axis=0)
    tl.store(sq, total)
    tl.store(norm, tl.sqrt(total).to(tl.float32))


def norm_programs(table: PointerTable) -> int:
    """Partial sums a bucket writes: one per program of its norm launch."""
    return launch.for_table(table, "norm")[1] if table.n_chunks else 0


def sq_partials(table: PointerTable, partials: Tensor, dtype, adaptive: bool, eta: float,
                inv_scale: Tensor | None = None, precondition: tuple[float, float] | None = None) -> None:
    """Write ``norm_programs(table)`` partial sums of squares into ``partials[0:...]`` (fp64); with AMP's
    ``inv_scale`` (a one-element fp32 device tensor) the gradients are unscaled as they are read.
    ``precondition`` = (1 / sqrt(1 - beta2^t), eps): each gradient divided by Adam's denominator
    ``sqrt(v) / sqrt(1 - beta2^t) + eps``, ``v`` the state-2 column (exp_avg_sq); not with ASAM."""
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "norm")
    inv = partials if inv_scale is None else inv_scale
    if precondition is not None:
        _sq_pre_partials_kernel[(grid,)](
            table.chunks, table.tensors, partials, table.n_chunks * cfg.split, float(precondition[1]), inv,
            float(precondition[0]), DTYPE=TL_DTYPES[dtype], AMP=inv_scale is not None, ALIGNED=table.aligned,
            **cfg.kwargs(),
        )
        return
    _sq_partials_kernel[(grid,)](
        table.chunks, table.tensors, partials, table.n_chunks * cfg.split, float(eta), inv,
        DTYPE=TL_DTYPES[dtype], ADAPTIVE=bool(adaptive), AMP=inv_scale is not None, ALIGNED=table.aligned,
        **cfg.kwargs(),
    )


def finalize(partials: Tensor, n: int, sq: Tensor, norm: Tensor) -> None:
    """``sq = sum(partials[:n])`` (fp64), ``norm = sqrt(sq)`` (fp32) in one program, fixed order."""
    _finalize_kernel[(1,)](partials, n, sq, norm, PBLOCK=max(triton.next_power_of_2(n), 16))
