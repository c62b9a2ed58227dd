"""The Triton backend: each bucket is one launch per kernel, through a device-resident pointer table.

Launches per step for B buckets: B norm + 1 finalize + B perturb + B restore/update, whatever the
number of tensors (GSAM and LookSAM: B + 1 more for their dot products). One table per bucket (numel, p, g, backup, state 1, state 2) serves the three
passes; it is rebuilt and re-sent only when the bucket's lists change (new ``.grad`` tensors,
state created), so a steady-state step uploads nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import msam
from ..kernels.dots import dots_partials, dots_programs, finalize_dots
from ..kernels.norm import finalize, norm_programs, sq_partials
from ..kernels.perturb import perturb as perturb_kernel
from ..kernels.table import TL_DTYPES, PointerTable
from ..kernels.update import restore_update
from ..plan import Bucket, Buffers
from ..update_scalars import UpdateScalars
from .amp import Amp
from .base import Combo
from .fused import FusedBackend


def bucket_table(bucket: Bucket, aux: Buffers | None = None) -> PointerTable:
    """The bucket's table (with ``direction``'s buffers in the grad column, or ``aux``'s in the aux
    column: other tables), rebuilt when the bucket's lists changed since it was built."""
    key = ("table", None if aux is None else id(aux))
    cached = bucket.cache.get(key)
    if cached is not None and cached[0] == bucket.version:
        return cached[1]
    table = cached[1] if cached is not None else PointerTable()
    n = len(bucket.params)
    s1 = bucket.state1 or [None] * n
    s2 = bucket.state2 or [None] * n
    ax = [None] * n if aux is None else bucket.buffers(aux)
    table.update(bucket.device, list(zip(bucket.params, bucket.grads(), bucket.backups, s1, s2, ax)))
    bucket.cache[key] = (bucket.version, table)
    return table


class TritonBackend(FusedBackend):
    name = "triton"
    dtypes = tuple(TL_DTYPES)

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._partials: Tensor | None = None  # the dot products' (fp32)
        self._sq_partials: Tensor | None = None  # the norm's (fp64)

    def _partials_for(self, n: int, device: torch.device) -> Tensor:
        if self._partials is None or self._partials.numel() < n or self._partials.device != device:
            self._partials = torch.empty(max(n, 64), dtype=torch.float32, device=device)
        return self._partials

    def _sq_partials_for(self, n: int, device: torch.device) -> Tensor:
        if self._sq_partials is None or self._sq_partials.numel() < n or self._sq_partials.device != device:
            self._sq_partials = torch.empty(max(n, 64), dtype=torch.float64, device=device)
        return self._sq_partials

    precondition_kernels = True

    def launch_sq(self, buckets: list[Bucket], extra: Tensor | None, sq: Tensor, norm: Tensor,
                  inv_scale: Tensor | None, pre: list | None = None) -> None:
        tables = [(bucket_table(b), b) for b in buckets]
        counts = [norm_programs(t) for t, _ in tables]
        partials = self._sq_partials_for(sum(counts) + 1, sq.device)
        off = 0
        for i, ((table, b), k) in enumerate(zip(tables, counts)):
            sq_partials(table, partials[off:], b.dtype, b.group["adaptive"], b.group["eta"], inv_scale,
                        None if pre is None else pre[i])
            off += k
        if extra is not None:
            partials[off : off + 1].copy_(extra.reshape(1))
            off += 1
        finalize(partials, off, sq, norm)

    def launch_perturb(self, bucket: Bucket, norm: Tensor,
                       inv_scale: Tensor | None, save: Buffers | None = None, pre=None) -> None:
        g = bucket.group
        perturb_kernel(bucket_table(bucket, save), norm, bucket.dtype, g["rho"], g["adaptive"], g["eta"],
                       inv_scale, save is not None, pre)

    def launch_update(self, bucket: Bucket, update: UpdateScalars, amp: Amp | None, combo: Combo | None = None) -> None:
        if combo is None:
            restore_update(bucket_table(bucket), bucket.dtype, update, amp)
            return
        restore_update(bucket_table(bucket, aux=combo.aux), bucket.dtype, update, amp,
                       combo.coef[bucket.index], 2 if combo.write else 1)

    def launch_dots(self, buckets: list[Bucket], aux: Buffers, out: Tensor, inv_scale: Tensor | None) -> None:
        tables = [(bucket_table(b, aux=aux), b) for b in buckets]
        counts = [dots_programs(t) for t, _ in tables]
        partials = self._partials_for(3 * sum(counts) + 3, out.device)
        off = 0
        for (table, b), k in zip(tables, counts):
            dots_partials(table, partials[3 * off:], b.dtype, inv_scale)
            off += k
        finalize_dots(partials, off, out)

    # ------------------------------------------------------------------ Momentum-SAM
    def msam_update(self, launches, inv: Tensor, inv_next: Tensor, amp: Amp | None, extra: Tensor | None,
                    device: torch.device) -> Tensor:
        if not launches:
            return super().msam_update(launches, inv, inv_next, amp, extra, device)
        sq, _ = self._scalars(device)
        tables = [bucket_table(b) for b, _, _ in launches]
        counts = [msam.programs(t) for t in tables]
        partials = self._sq_partials_for(sum(counts) + 1, device)
        off = 0
        for table, (bucket, update, restore_rho), k in zip(tables, launches, counts):
            msam.update(table, partials[off:], bucket.dtype, update, restore_rho is not None,
                       0.0 if restore_rho is None else restore_rho, inv, amp)
            off += k
        if extra is not None:
            partials[off : off + 1].copy_(extra.reshape(1))
            off += 1
        msam.finalize(partials, off, sq, inv, inv_next, None if amp is None else amp[1])
        return sq

    def launch_msam_perturb(self, bucket: Bucket, inv_next: Tensor, amp: Amp | None) -> None:
        msam.perturb(bucket_table(bucket), bucket.dtype, bucket.group["rho"], inv_next,
                     None if amp is None else amp[1])
