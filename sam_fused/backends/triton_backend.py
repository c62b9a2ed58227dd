"""The Triton backend: each bucket is one launch per kernel, through a device-resident pointer table.

Launches per step for B buckets: B norm + 1 finalize + B perturb + B restore/update, whatever the
number of tensors. Tables are built once per tensor list and re-sent only when an address changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.norm import finalize, norm_programs, sq_partials
from ..kernels.perturb import perturb as perturb_kernel
from ..kernels.table import PointerTable
from ..kernels.update import restore_update
from ..spec import Update
from .flat import Bucket, FlatBackend


class TritonBackend(FlatBackend):
    name = "triton"

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._tables: dict[tuple, PointerTable] = {}
        self._partials: Tensor | None = None
        self._norm: Tensor | None = None

    def invalidate(self) -> None:
        self._tables.clear()

    def _table(self, bucket: Bucket) -> PointerTable:
        table = self._tables.get(bucket.key)
        if table is None:
            table = self._tables[bucket.key] = PointerTable()
        return table.update(bucket.device, bucket.columns)

    def _buffers(self, n_partials: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._partials is None or self._partials.numel() < n_partials or self._partials.device != device:
            self._partials = torch.empty(max(n_partials, 64), dtype=torch.float32, device=device)
        if self._norm is None or self._norm.device != device:
            self._norm = torch.empty((), dtype=torch.float32, device=device)
        return self._partials, self._norm

    def launch_norm(self, buckets, slow_sq, device) -> Tensor:
        tables = [(self._table(b), b.dtype, g) for b, g in buckets]
        counts = [norm_programs(t) for t, _, _ in tables]
        partials, norm = self._buffers(sum(counts) + 1, device)
        off = 0
        for (table, dtype, group), k in zip(tables, counts):
            sq_partials(table, partials[off:], dtype, group["adaptive"], group["eta"])
            off += k
        if slow_sq is not None:
            partials[off : off + 1].copy_(slow_sq.reshape(1))
            off += 1
        finalize(partials, off, norm)
        return norm

    def launch_perturb(self, bucket: Bucket, group: dict, norm: Tensor) -> None:
        perturb_kernel(self._table(bucket), norm, bucket.dtype, group["rho"], group["adaptive"], group["eta"])

    def launch_update(self, bucket: Bucket, update: Update) -> None:
        restore_update(self._table(bucket), bucket.dtype, update)
