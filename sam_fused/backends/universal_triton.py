"""Universal SAM on the Triton kernels: per (param group, dtype) bucket, one perturb and one
accumulate launch per sample (the last accumulate also restores and combines), whatever the
number of tensors. Parameters the kernels cannot index flat use the reference ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import universal as K
from ..kernels.table import TL_DTYPES, PointerTable
from ..layout import same_layout
from ..distributed import local, shard_start
from ..plan import MAX_PLANS
from .base import GroupWork
from .universal_reference import UniversalTorchBackend, loss_tensor, sample_seed


class UniversalTritonBackend(UniversalTorchBackend):
    name = "triton"

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._tables: dict[tuple, PointerTable] = {}
        self._losses: Tensor | None = None

    def invalidate(self) -> None:
        super().invalidate()
        self._tables.clear()

    def _split(self, work: list[GroupWork]):
        """Per group: flat buckets by dtype, and the parameters left to the reference ops."""
        offset, fast, slow = 0, [], []
        for gw in work:
            by_dtype: dict[torch.dtype, list[tuple[Tensor, int]]] = {}
            rest = GroupWork(gw.index, gw.group)
            for p in gw.params:
                if p.dtype in TL_DTYPES and same_layout(local(p), local(p.grad)):
                    # the noise of element i is drawn from (seed, offset + i): a DTensor shard takes
                    # the draws of its elements' global positions, as in a single process
                    by_dtype.setdefault(p.dtype, []).append((p, offset + shard_start(p)))
                else:
                    rest.params.append(p)
                offset += p.numel()  # the global size for a DTensor
            fast += [(gw.group, dtype, items) for dtype, items in by_dtype.items()]
            if rest.params:
                slow.append(rest)
        return fast, slow

    def _table(self, items: list[tuple[Tensor, int]], noise: list[Tensor] | None) -> PointerTable:
        key = tuple(id(p) for p, _ in items)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= MAX_PLANS:  # bounded: one table per recent set of parameters
                self._tables.pop(next(iter(self._tables)))
            table = self._tables[key] = PointerTable(K.UNCOL)
        cols = []
        for j, (p, offset) in enumerate(items):
            bufs = (self.backup_for(p), self._buf(p, "g0"), self._buf(p, "acc1", torch.float32),
                    self._buf(p, "acc2", torch.float32) if self.opt.measure == "frob" else None)
            cols.append((local(p), local(p.grad), *bufs, None if noise is None else noise[j], offset))
        return table.update(local(items[0][0]).device, cols)

    def begin(self, work: list[GroupWork], loss: Tensor) -> None:
        device = self.norm_device(work)
        n = self.opt.n_samples
        if self._losses is None or self._losses.numel() != n + 1 or self._losses.device != device:
            self._losses = torch.empty(n + 1, dtype=torch.float32, device=device)
        self._losses[0].copy_(loss_tensor(loss, device))
        self._fast, self._slow = self._split(work)
        if self._slow:
            super().begin(self._slow, loss)

    def perturb(self, work: list[GroupWork], step: int, sample: int) -> None:
        opt = self.opt
        explicit = None
        if opt.noise is not None:  # the same explicit draws the reference would use, per parameter
            params = [p for gw in work for p in gw.params]
            explicit = dict(zip(map(id, params), self.noise(work, step, sample)))
        seed = sample_seed(opt.seed, step, sample)
        for group, dtype, items in self._fast:
            noise = None if explicit is None else [explicit[id(p)].contiguous() for p, _ in items]
            K.perturb(self._table(items, noise), dtype, seed, group["rho"], opt.h, start=sample == 0,
                      uniform=opt.measure == "det", explicit=noise is not None)
        if self._slow:
            if explicit is None:
                super().perturb(self._slow, step, sample)
            else:
                zs = iter(explicit[id(p)] for gw in self._slow for p in gw.params)
                for gw in self._slow:
                    for p in gw.params:
                        local(p).detach().copy_(self.backup_for(p).float() + gw.group["rho"] * next(zs))

    def accumulate(self, work: list[GroupWork], sample: int, loss: Tensor) -> None:
        opt = self.opt
        n = opt.n_samples
        self._losses[sample + 1].copy_(loss_tensor(loss, self._losses.device))
        last = sample == n - 1
        for group, dtype, items in self._fast:
            for p, _ in items:
                if p.grad is None:  # no gradient at w + eps: a zero one, written to by the last pass
                    p.grad = torch.zeros_like(p)
            K.accumulate(self._table(items, None), dtype, self._losses, sample, n, group["rho"], group["lam"],
                         opt.measure, first=sample == 0, last=last)
        if self._slow:
            super().accumulate(self._slow, sample, loss)

    def finish(self, work: list[GroupWork]) -> None:
        if self._slow:  # the flat buckets were restored and combined by the last accumulate
            super().finish(self._slow)
