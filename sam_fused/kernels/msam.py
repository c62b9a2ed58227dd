"""Momentum-SAM's two passes (the math: ``backends/reference.py``, ``MSAM_RULES``).

Pass 1 (one persistent launch per bucket, 512 programs at most by default, each walking chunks
k, k + G, ...): per element, the restore ``w + r m`` with the old first moment and the old ``r``
(the rho that made the perturbation times the old inv, whatever the group's rho is now), the base update
(SGD with momentum, or Adam/AdamW with the AdamW decay after the step), and the sum of squares of
the new first moment as stored (fp64), one partial per program. Then one program sums the partials
of every bucket in a fixed order into ``sq`` and writes ``inv_next = 1 / (sqrt(sq) + 1e-12)`` (or
the old inv when AMP found an inf; 0 when the norm is not finite: nothing is perturbed).
Pass 2 (one launch per bucket, a program per chunk): ``w -= rho * inv_next * m``.

Bytes per element, fp32: SGD pass 1 reads w, g, m and writes w, m (20 B), pass 2 reads w, m and
writes w (12 B): 32 B, against 20 B for torch's fused SGD step. Adam: 28 B + 12 B = 40 B (AdamW:
28 B). Nothing is backed up: the restore is arithmetic, so Momentum-SAM needs no parameter-sized
buffer beyond the base optimizer's state.

AMP: the gradient is read times ``inv_scale``; with ``found_inf`` set (SGD only: Adam's skip is
decided on the host, where its step count lives) neither pass writes anything.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..update_scalars import UpdateScalars
from . import launch
from .table import (COL_GRAD, COL_PARAM, COL_STATE1, COL_STATE2, NCOL, NORM_EPS, OPT_SGD, TL_DTYPES, PointerTable,
                    chunk_of, column, load, nothing, store, to_dtype, walk_all)


@triton.jit
def _update_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    (p, g, s1, s2, skip, r, sign, lr, l2, decay, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps,
     step_size, bias_correction2_sqrt) = args
    DTYPE: tl.constexpr = C[0]
    OPT: tl.constexpr = C[1]
    RESTORE: tl.constexpr = C[2]
    AMP: tl.constexpr = C[3]
    raw = load(p, idx, mask, MASKED)
    w = raw.to(tl.float32)
    d = load(g, idx, mask, MASKED).to(tl.float32) * sign + l2 * w
    old1 = load(s1, idx, mask, MASKED)
    m = old1.to(tl.float32)
    if RESTORE:
        w = w + r * m
    if OPT == OPT_SGD:
        m = m * keep + coef * d
        w = w - lr * m
    else:
        old2 = load(s2, idx, mask, MASKED)
        v = old2.to(tl.float32)
        m = m + one_minus_beta1 * (d - m)
        v = v * beta2 + one_minus_beta2 * d * d
        w = w - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
        w = w * decay
        new2 = to_dtype(v, DTYPE)
        if AMP:
            new2 = tl.where(skip, old2, new2)
        store(s2, idx, new2, mask, MASKED)
    new1 = to_dtype(m, DTYPE)
    out = to_dtype(w, DTYPE)
    if AMP:
        new1 = tl.where(skip, old1, new1)
        out = tl.where(skip, raw, out)
    store(s1, idx, new1, mask, MASKED)
    store(p, idx, out, mask, MASKED)
    m64 = new1.to(tl.float64)
    return acc + m64 * m64


@triton.jit
def _update_kernel(
    chunks, tensors, partials, n_chunks, inv_ptr, inv_scale_ptr, found_inf_ptr, rho,
    sign, lr, l2, decay, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
    DTYPE: tl.constexpr, OPT: tl.constexpr, RESTORE: tl.constexpr, AMP: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    r = rho * tl.load(inv_ptr)
    skip = False
    if AMP:
        sign = sign * tl.load(inv_scale_ptr)
        skip = tl.load(found_inf_ptr) != 0.0
    args_tail = (skip, r, sign, lr, l2, decay, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                 bias_correction2_sqrt)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc_t = tl.zeros([TAIL], dtype=tl.float64)
    for c in range(pid, n_chunks, tl.num_programs(0)):
        row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
        p = column(row, COL_PARAM, DTYPE, ALIGNED)
        g = column(row, COL_GRAD, DTYPE, ALIGNED)
        s1 = column(row, COL_STATE1, DTYPE, ALIGNED)
        s2 = column(row, COL_STATE2, DTYPE, ALIGNED)
        acc, acc_t = walk_all(start, end, _update_block, (p, g, s1, s2) + args_tail, (DTYPE, OPT, RESTORE, AMP), acc,
                              acc_t, BLOCK, TAIL, STAGES)
    if TAIL == BLOCK:  # the tails went into acc
        tl.store(partials + pid, tl.sum(acc, axis=0))
    else:
        tl.store(partials + pid, tl.sum(acc, axis=0) + tl.sum(acc_t, axis=0))


@triton.jit
def _finalize_kernel(partials, n, sq, inv_ptr, inv_next_ptr, found_inf_ptr, AMP: tl.constexpr, PBLOCK: tl.constexpr):
    offs = tl.arange(0, PBLOCK)
    total = tl.sum(tl.load(partials + offs, mask=offs < n, other=0.0), axis=0)
    tl.store(sq, total)
    norm = tl.sqrt(total).to(tl.float32)
    new = tl.where(norm < float("inf"), 1.0 / (norm + NORM_EPS), 0.0)  # inf and NaN: no perturbation
    if AMP:
        new = tl.where(tl.load(found_inf_ptr) != 0.0, tl.load(inv_ptr), new)
    tl.store(inv_next_ptr, new)


@triton.jit
def _perturb_block(args, C: tl.constexpr, idx, mask, acc, MASKED: tl.constexpr):
    p, s1, r = args
    DTYPE: tl.constexpr = C[0]
    w = load(p, idx, mask, MASKED).to(tl.float32)
    m = load(s1, idx, mask, MASKED).to(tl.float32)
    store(p, idx, to_dtype(w - r * m, DTYPE), mask, MASKED)
    return acc


@triton.jit
def _perturb_chunk(chunks, tensors, c, r, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr):
    row, start, end = chunk_of(chunks, tensors, c, CHUNK, NCOL)
    p = column(row, COL_PARAM, DTYPE, ALIGNED)
    s1 = column(row, COL_STATE1, DTYPE, ALIGNED)
    walk_all(start, end, _perturb_block, (p, s1, r), (DTYPE,), nothing(), nothing(), BLOCK, TAIL, STAGES)


@triton.jit
def _perturb_kernel(chunks, tensors, n_chunks, inv_next_ptr, found_inf_ptr, rho, DTYPE: tl.constexpr,
                    AMP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    TAIL: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr):
    r = rho * tl.load(inv_next_ptr)
    go = True
    if AMP:
        go = tl.load(found_inf_ptr) == 0.0
    if go:  # uniform over the launch: a branch, not a mask
        if PERSISTENT:
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                _perturb_chunk(chunks, tensors, c, r, DTYPE, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)
        else:
            _perturb_chunk(chunks, tensors, tl.program_id(0).to(tl.int64), r, DTYPE, ALIGNED, CHUNK, BLOCK, TAIL, STAGES)


def programs(table: PointerTable) -> int:
    """Partial sums pass 1 writes for a table: one per program."""
    return launch.for_table(table, "msam_update")[1] if table.n_chunks else 0


def update(table: PointerTable, partials: Tensor, dtype, u: UpdateScalars, restore: bool, rho: float, inv: Tensor,
           amp=None) -> None:
    """Pass 1 over the table; ``programs(table)`` partial sums into ``partials[0:...]`` (fp64).
    ``rho``: the radius of the perturbation the restore undoes (the one that made it)."""
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "msam_update")
    (sign, lr, l2, decay, _momentum, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
     bc2) = u.scalars()
    inv_scale, found_inf = amp if amp is not None else (inv, inv)
    _update_kernel[(grid,)](
        table.chunks, table.tensors, partials, table.n_chunks * cfg.split, inv, inv_scale, found_inf, float(rho),
        sign, lr, l2, decay, keep, coef, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2,
        DTYPE=TL_DTYPES[dtype], OPT=u.opt, RESTORE=bool(restore), AMP=amp is not None, ALIGNED=table.aligned,
        **cfg.kwargs(),
    )


def finalize(partials: Tensor, n: int, sq: Tensor, inv: Tensor, inv_next: Tensor, found_inf: Tensor | None) -> None:
    """``sq = sum(partials[:n])`` in a fixed order, ``inv_next`` from it (``inv`` when found_inf is set)."""
    _finalize_kernel[(1,)](partials, n, sq, inv, inv_next, inv if found_inf is None else found_inf,
                           AMP=found_inf is not None, PBLOCK=max(triton.next_power_of_2(n), 16))


def perturb(table: PointerTable, dtype, rho: float, inv_next: Tensor, found_inf: Tensor | None) -> None:
    """Pass 2 over the table."""
    if table.n_chunks == 0:
        return
    cfg, grid = launch.for_table(table, "msam_perturb")
    _perturb_kernel[(grid,)](
        table.chunks, table.tensors, table.n_chunks * cfg.split, inv_next, inv_next if found_inf is None else found_inf,
        float(rho), DTYPE=TL_DTYPES[dtype], AMP=found_inf is not None, ALIGNED=table.aligned,
        PERSISTENT=cfg.persistent, **cfg.kwargs(),
    )
