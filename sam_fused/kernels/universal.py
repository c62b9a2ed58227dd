"""Universal SAM (Frob-, Trace-, Det-SAM) kernels: noise drawn in the kernel, sums fused into the
pass that reads each sample's gradient.

Table rows (UNCOL = 9): numel, p, g (this sample's grad), backup, g0, acc1 (fp32), acc2 (fp32),
explicit noise (fp32, or 0), element offset of the tensor among all parameters (for Philox).

    perturb (sample i):  [first: backup = w, g0 = g]  w = backup + rho * noise_i
                         noise_i = randn(seed_i, offset) or (2 rand(seed_i, offset) - 1) h: never stored
    accumulate (i):      acc1 += a_i (g - g0)  [Frob: acc2 += g - g0], a_i from the loss buffer
    last accumulate:     + restore w = backup and write g0 + c1 acc1 + c2 acc2 into the grad

Losses stay on the device in a small fp32 buffer [L0, L1, ..., Ln] that the kernels read.
Bytes per element per sample (fp32): perturb 8 (first: 20), accumulate 12-20, last +12. Chunks
are walked as unmasked full blocks (16-byte accesses when the table is aligned) and a masked tail,
as in FusedSAM's kernels (kernels/table.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch
from .table import TL_DTYPES, PointerTable, chunk_of, column, load, store, to_dtype, walk_all, nothing

UNCOL = 9
MEASURE_CODES = {"frob": 0, "trace": 1, "det": 2}


@triton.jit
def _usam_perturb_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, b, g0, noise, base, seed, rho, h = args
    DTYPE: tl.constexpr = C[0]
    START: tl.constexpr = C[1]
    UNIFORM: tl.constexpr = C[2]
    EXPLICIT: tl.constexpr = C[3]
    if START:
        raw = load(p, idx, mask, MASKED)
        store(b, idx, raw, mask, MASKED)
        store(g0, idx, load(g, idx, mask, MASKED), mask, MASKED)
    else:
        raw = load(b, idx, mask, MASKED)
    if EXPLICIT:
        z = load(noise, idx, mask, MASKED)
    elif UNIFORM:
        z = (tl.rand(seed, base + idx) * 2.0 - 1.0) * h
    else:
        z = tl.randn(seed, base + idx)
    store(p, idx, to_dtype(raw.to(tl.float32) + rho * z, DTYPE), mask, MASKED)
    return acc


@triton.jit
def _usam_perturb_chunk(chunks, tensors, c, seed, rho, h, DTYPE: tl.constexpr, START: tl.constexpr,
                        UNIFORM: tl.constexpr, EXPLICIT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr):
    row, start, end = chunk_of(chunks, tensors, c, CHUNK, 9)
    p = column(row, 1, DTYPE, ALIGNED)
    g = column(row, 2, DTYPE, ALIGNED)
    b = column(row, 3, DTYPE, ALIGNED)
    g0 = column(row, 4, DTYPE, ALIGNED)
    noise = column(row, 7, tl.float32, ALIGNED)
    base = tl.load(row + 8)
    walk_all(start, end, _usam_perturb_block, (p, g, b, g0, noise, base, seed, rho, h), (DTYPE, START, UNIFORM, EXPLICIT),
         nothing(), nothing(), BLOCK, TAIL, STAGES)


@triton.jit
def _usam_perturb_kernel(
    chunks, tensors, n_chunks, seed, rho, h,
    DTYPE: tl.constexpr, START: tl.constexpr, UNIFORM: tl.constexpr, EXPLICIT: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    if PERSISTENT:
        for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            _usam_perturb_chunk(chunks, tensors, c, seed, rho, h, DTYPE, START, UNIFORM, EXPLICIT, ALIGNED, CHUNK,
                                BLOCK, TAIL, STAGES)
    else:
        _usam_perturb_chunk(chunks, tensors, tl.program_id(0).to(tl.int64), seed, rho, h, DTYPE, START, UNIFORM,
                            EXPLICIT, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


@triton.jit
def _sample_weight(losses, i, n, rho, MEASURE: tl.constexpr):
    """a_i: Frob L_i - L0; Trace 1/n; Det psi'(d_i)/n = -exp(-d_i/2)/(2n), d_i = (L_i - L0)/rho^2."""
    dl = tl.load(losses + i + 1) - tl.load(losses)
    if MEASURE == 0:
        a = dl
    elif MEASURE == 1:
        a = 1.0 / n + 0.0 * dl
    else:
        a = -0.5 * tl.exp(-dl / (2.0 * rho * rho)) / n
    return a


@triton.jit
def _usam_accumulate_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, g, b, g0, acc1, acc2, a, c1, c2 = args
    DTYPE: tl.constexpr = C[0]
    MEASURE: tl.constexpr = C[1]
    FIRST: tl.constexpr = C[2]
    LAST: tl.constexpr = C[3]
    base = load(g0, idx, mask, MASKED).to(tl.float32)
    diff = load(g, idx, mask, MASKED).to(tl.float32) - base
    s1 = a * diff
    if not FIRST:
        s1 += load(acc1, idx, mask, MASKED)
    if MEASURE == 0:
        s2 = diff
        if not FIRST:
            s2 += load(acc2, idx, mask, MASKED)
    if LAST:
        out = base + c1 * s1
        if MEASURE == 0:
            out += c2 * s2
        store(g, idx, to_dtype(out, DTYPE), mask, MASKED)
        store(p, idx, load(b, idx, mask, MASKED), mask, MASKED)
    else:
        store(acc1, idx, s1, mask, MASKED)
        if MEASURE == 0:
            store(acc2, idx, s2, mask, MASKED)
    return acc


@triton.jit
def _usam_accumulate_chunk(chunks, tensors, c, a, c1, c2, DTYPE: tl.constexpr, MEASURE: tl.constexpr,
                           FIRST: tl.constexpr, LAST: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr):
    row, start, end = chunk_of(chunks, tensors, c, CHUNK, 9)
    p = column(row, 1, DTYPE, ALIGNED)
    g = column(row, 2, DTYPE, ALIGNED)
    b = column(row, 3, DTYPE, ALIGNED)
    g0 = column(row, 4, DTYPE, ALIGNED)
    acc1 = column(row, 5, tl.float32, ALIGNED)
    acc2 = column(row, 6, tl.float32, ALIGNED)
    walk_all(start, end, _usam_accumulate_block, (p, g, b, g0, acc1, acc2, a, c1, c2), (DTYPE, MEASURE, FIRST, LAST),
         nothing(), nothing(), BLOCK, TAIL, STAGES)


@triton.jit
def _usam_accumulate_kernel(
    chunks, tensors, n_chunks, losses, i, n, rho, lam,
    DTYPE: tl.constexpr, MEASURE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    a = _sample_weight(losses, i, n, rho, MEASURE)
    c1 = a * 0.0
    c2 = a * 0.0
    if LAST:  # the coefficients of the combination, from all the losses
        l0 = tl.load(losses)
        total = l0 * 0.0
        for j in range(1, n + 1):
            dl = tl.load(losses + j) - l0
            if MEASURE == 2:
                total += tl.exp(-dl / (2.0 * rho * rho))
            else:
                total += dl
        if MEASURE == 0:
            c1 = lam / (rho * rho) / (n - 1) + 0.0 * total
            c2 = -c1 * total / n
        elif MEASURE == 1:
            c1 = lam + 0.0 * total
        else:
            x = total / n
            c1 = lam * (-2.0 / (x * x * x))
    if PERSISTENT:
        for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            _usam_accumulate_chunk(chunks, tensors, c, a, c1, c2, DTYPE, MEASURE, FIRST, LAST, ALIGNED, CHUNK, BLOCK, TAIL,
                                   STAGES)
    else:
        _usam_accumulate_chunk(chunks, tensors, tl.program_id(0).to(tl.int64), a, c1, c2, DTYPE, MEASURE, FIRST, LAST,
                               ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


def perturb(table: PointerTable, dtype, seed: int, rho: float, h: float, start: bool, uniform: bool,
            explicit: bool) -> None:
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "usam_perturb")
    _usam_perturb_kernel[(grid,)](
        table.chunks, table.tensors, table.n_chunks * cfg.split, int(seed), float(rho), float(h),
        DTYPE=TL_DTYPES[dtype], START=bool(start), UNIFORM=bool(uniform), EXPLICIT=bool(explicit),
        ALIGNED=table.aligned, PERSISTENT=cfg.persistent, **cfg.kwargs(),
    )


def accumulate(table: PointerTable, dtype, losses, i: int, n: int, rho: float, lam: float, measure: str,
               first: bool, last: bool) -> None:
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "usam_accumulate")
    _usam_accumulate_kernel[(grid,)](
        table.chunks, table.tensors, table.n_chunks * cfg.split, losses, int(i), int(n), float(rho), float(lam),
        DTYPE=TL_DTYPES[dtype], MEASURE=MEASURE_CODES[measure], FIRST=bool(first), LAST=bool(last),
        ALIGNED=table.aligned, PERSISTENT=cfg.persistent, **cfg.kwargs(),
    )
