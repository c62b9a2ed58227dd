"""Device-resident pointer tables, so that one launch covers every tensor of a (group, dtype) bucket.

A table has two int64 arrays on the parameters' device:

    chunks:  [n_chunks, 2]        (tensor index, first element of the chunk)
    tensors: [n_tensors, NCOL]    (numel, address of p, g, source/backup, state 1, state 2, aux)

A kernel program reads its chunk row, then the row of its tensor, and turns the stored addresses
into typed pointers with ``.to(tl.pointer_type(DTYPE))``. The chunk array depends only on the
numels and is built once; the tensor array is re-sent (one small host-to-device copy from pinned
memory, asynchronous) only when an address changes, which happens when autograd hands out new
``.grad`` tensors at other addresses than the last ones. Nothing here waits for the device, and a
re-send allocates nothing once warm: it writes one of the table's own pinned staging buffers
(:class:`Staging`) and copies it into the table's device array in place, in stream order (which
also keeps the array's address, so a captured CUDA graph sees the new contents).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import constants

# The shared constants, as compile-time values the kernels may read as globals.
# The pointer table's chunk: a kernel's program-chunk (its CHUNK constexpr) divides it.
TABLE_CHUNK = tl.constexpr(constants.CHUNK)
NCOL = tl.constexpr(constants.NCOL)
COL_PARAM = tl.constexpr(constants.COL_PARAM)
COL_GRAD = tl.constexpr(constants.COL_GRAD)
COL_BACKUP = tl.constexpr(constants.COL_BACKUP)
COL_STATE1 = tl.constexpr(constants.COL_STATE1)
COL_STATE2 = tl.constexpr(constants.COL_STATE2)
COL_AUX = tl.constexpr(constants.COL_AUX)
NORM_EPS = tl.constexpr(constants.NORM_EPS)
OPT_RESTORE = tl.constexpr(constants.OPT_RESTORE)
OPT_SGD = tl.constexpr(constants.OPT_SGD)

# Chunk, block, warps and grid of each launch: kernels/launch.py, from launch_configs.json.

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Staging:
    """Pinned host buffers for uploads, reused. A buffer is written only once the copy that last
    read it has run (its event has completed, asked without waiting), so the host never waits on the
    device and the device never reads a half-written buffer; while every buffer is still in flight
    (new gradients on both passes of a step, queued behind a long backward) the ring grows by one.
    It settles at the number of uploads in flight at once, two or three in a training loop."""

    def __init__(self, pinned=None, event=None) -> None:
        self._ring: list[list] = []  # [host buffer, event of its last copy or None]
        self._pinned = pinned or (lambda n: torch.empty(n, dtype=torch.int64, pin_memory=True))
        self._event = event or torch.cuda.Event
        self.allocations = 0

    def acquire(self, n: int) -> list:
        for slot in self._ring:
            if slot[0].numel() >= n and (slot[1] is None or slot[1].query()):
                return slot
        slot = [self._pinned(max(n, 64)), None]
        self.allocations += 1
        self._ring.append(slot)
        return slot

    def upload(self, values: list[int], dst: Tensor | None, device: torch.device) -> Tensor:
        """``values`` in an int64 device array: ``dst`` itself when it has their size, else a new one."""
        n = len(values)
        slot = self.acquire(n)
        host = slot[0][:n]
        host.copy_(torch.tensor(values, dtype=torch.int64))
        if dst is None or dst.numel() != n or dst.device != device:
            dst = torch.empty(n, dtype=torch.int64, device=device)
        dst.copy_(host, non_blocking=True)
        if slot[1] is None:
            slot[1] = self._event()
        slot[1].record()
        return dst


def _upload(values: list[int], device: torch.device, staging: Staging | None = None,
            dst: Tensor | None = None) -> Tensor:
    values = values if values else [0]
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64)
    return (staging or Staging()).upload(values, dst, device)


class PointerTable:
    """Chunk and address table of one list of same-dtype tensors on one device."""

    def __init__(self, ncol: int = constants.NCOL) -> None:
        self.ncol = ncol
        self.n_chunks = 0
        self.chunks: Tensor | None = None
        self.tensors: Tensor | None = None
        self._numels: list[int] | None = None
        self._addrs: list[int] | None = None
        self._staging = Staging() if torch.cuda.is_available() else None
        self.numel = 0  # elements over every tensor: the size class of the launch configurations
        self.device: torch.device | None = None
        self.launch_cache: dict = {}  # pass -> the configuration and grid chosen (kernels/launch.py)
        self.aligned = False  # every address a multiple of 16 bytes: kernels may use vector accesses

    def update(self, device: torch.device, columns: list[tuple[Tensor | int | None, ...]]) -> "PointerTable":
        """``columns[i]`` = the tensors of row i after its numel ((p, g, source, state1, state2) for
        FusedSAM); ``None`` for an unused slot, an int for a plain value."""
        numels = [c[0].numel() for c in columns]
        if numels != self._numels:
            rows: list[int] = []
            for i, n in enumerate(numels):
                for start in range(0, n, constants.CHUNK):
                    rows += (i, start)
            self.chunks = _upload(rows, device, self._staging, self.chunks)
            self.n_chunks = len(rows) // 2
            self._numels = numels
            self.numel = sum(numels)
        self.device = torch.device(device)
        addrs: list[int] = []
        for n, cols in zip(numels, columns):
            addrs.append(n)
            addrs.extend(0 if t is None else t if isinstance(t, int) else t.data_ptr() for t in cols)
            addrs.extend(0 for _ in range(self.ncol - 1 - len(cols)))
        if addrs != self._addrs:
            self.tensors = _upload(addrs, device, self._staging, self.tensors)
            self._addrs = addrs
            self.aligned = all(
                t is None or isinstance(t, int) or t.data_ptr() % 16 == 0 for cols in columns for t in cols
            )
        return self


@triton.jit
def chunk_of(chunks, tensors, c, CHUNK: tl.constexpr, NCOL: tl.constexpr):
    """(tensor row, first element, one past the last element) of program-chunk ``c``; rows are
    NCOL wide. A table chunk (TABLE_CHUNK elements) holds TABLE_CHUNK // CHUNK program-chunks;
    one past its tensor's end is empty (start == end)."""
    SPLIT: tl.constexpr = TABLE_CHUNK // CHUNK
    if SPLIT == 1:
        t = tl.load(chunks + 2 * c)
        start = tl.load(chunks + 2 * c + 1)
        row = tensors + t * NCOL
        end = tl.minimum(start + CHUNK, tl.load(row))
    else:
        c64 = tl.cast(c, tl.int64)
        tc = c64 // SPLIT
        t = tl.load(chunks + 2 * tc)
        start = tl.load(chunks + 2 * tc + 1) + (c64 % SPLIT) * CHUNK
        row = tensors + t * NCOL
        end = tl.maximum(tl.minimum(start + CHUNK, tl.load(row)), start)
    return row, start, end


@triton.jit
def column(row, k: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address in column ``k`` of a tensor row, as a pointer to ``DTYPE``; with ALIGNED (the host
    checked every address of the table) the compiler is told it is a multiple of 16 bytes."""
    ptr = tl.load(row + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# The element loop of every kernel: [start, end) as full BLOCKs, unmasked, with the hints that
# let the compiler emit 16-byte accesses (a chunk starts at a multiple of CHUNK, itself a multiple
# of BLOCK), then at most one masked tail block. A masked load of an unknown end cannot be
# vectorized: with one loop, every access was 4 bytes wide in the PTX.
@triton.jit
def walk(start, end, body: tl.constexpr, args, C: tl.constexpr, acc, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """``acc = body(args, C, idx, mask, acc, MASKED)`` over the blocks of [start, end): ``args`` is
    a tuple of runtime values (pointers, scalars), ``C`` one of compile-time switches, ``acc`` a
    tensor carried through (a body that only writes returns it unchanged: ``NOTHING``). STAGES > 0
    runs the full blocks as ``tl.range(..., num_stages=STAGES)`` (software pipelining where the
    compiler applies it). The masked tail is left to :func:`walk_tail`."""
    n_full = (end - start) // BLOCK
    if STAGES > 0:
        for k in tl.range(0, n_full, num_stages=STAGES):
            idx = tl.max_contiguous(tl.multiple_of(start + k * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
            acc = body(args, C, idx, idx, acc, False)
    else:
        for k in range(0, n_full):
            idx = tl.max_contiguous(tl.multiple_of(start + k * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
            acc = body(args, C, idx, idx, acc, False)
    return acc, start + n_full * BLOCK


@triton.jit
def walk_all(start, end, body: tl.constexpr, args, C: tl.constexpr, acc, acc_t, BLOCK: tl.constexpr,
             TAIL: tl.constexpr, STAGES: tl.constexpr):
    """The full blocks of [start, end) (:func:`walk`), then the masked rest: one masked BLOCK when
    TAIL == BLOCK, else masked TAIL-element steps into ``acc_t`` (shape [TAIL]). A masked access
    of an unknown end cannot be vectorized, so each element of a masked block has its own address:
    a narrow tail keeps those registers out of the kernel's count. Returns (acc, acc_t)."""
    acc, tail = walk(start, end, body, args, C, acc, BLOCK, STAGES)
    if TAIL == BLOCK:
        if tail < end:
            idx = tail + tl.arange(0, BLOCK)
            acc = body(args, C, idx, idx < end, acc, True)
    else:
        for t in range(tail, end, TAIL):
            idx = t + tl.arange(0, TAIL)
            acc_t = body(args, C, idx, idx < end, acc_t, True)
    return acc, acc_t


@triton.jit
def nothing():
    """The ``acc`` of a body that only writes."""
    return tl.zeros([1], dtype=tl.int32)


@triton.jit
def load(ptr, idx, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        return tl.load(ptr + idx)


@triton.jit
def store(ptr, idx, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, value, mask=mask)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even.

    bf16 is rounded by hand: Triton's CPU interpreter truncates on fp32 -> bf16 (measured: 4145 of
    8192 random values differ from torch's rounding), and on the GPU these integer ops hide under
    the memory traffic of an elementwise kernel. NaN stays NaN.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(DTYPE)
