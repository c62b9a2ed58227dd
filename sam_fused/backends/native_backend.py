"""The native backends: C++ kernels from ``csrc/`` on the CPU ("cpu") and on CUDA ("cuda").

A bucket is handed over as tensor lists; the CPU kernels walk it in parallel chunks (one pass per
fused operation), the CUDA kernels through a multi-tensor apply (a few launches per bucket).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import Bucket, Buffers
from ..spec import Update
from .base import Amp
from .flat import FlatBackend


class NativeBackend(FlatBackend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def __init__(self, optimizer, module, name: str) -> None:
        if name == "cuda":
            self.dtypes = (torch.float32, torch.bfloat16, torch.float16)
        super().__init__(optimizer)
        self._C = module
        self.name = name

    def launch_sq(self, buckets: list[Bucket], extra: Tensor | None, sq: Tensor, norm: Tensor,
                  direction: Buffers | None, inv_scale: Tensor | None) -> None:
        for i, b in enumerate(buckets):
            g = b.group
            self._C.sq_sum_(sq, b.params, b.grads(direction), adaptive=bool(g["adaptive"]), eta=float(g["eta"]),
                            accumulate=i > 0, inv_scale=inv_scale)
        if not buckets:
            sq.zero_()
        if extra is not None:
            sq.add_(extra)
        torch.sqrt(sq, out=norm)

    def launch_perturb(self, bucket: Bucket, norm: Tensor, direction: Buffers | None,
                       inv_scale: Tensor | None) -> None:
        g = bucket.group
        self._C.perturb_(bucket.params, bucket.grads(direction), bucket.backups, norm=norm, rho=float(g["rho"]),
                         adaptive=bool(g["adaptive"]), eta=float(g["eta"]), inv_scale=inv_scale)

    def launch_update(self, bucket: Bucket, u: Update, amp: Amp | None) -> None:
        inv_scale, found_inf = amp if amp is not None else (None, None)
        self._C.restore_update_(
            bucket.params, bucket.grads() if u.opt else [], bucket.backups, bucket.state1 or [], bucket.state2 or [],
            opt=u.opt, has_momentum=u.momentum != 0, nesterov=bool(u.nesterov), scalars=u.scalars(),
            inv_scale=inv_scale, found_inf=found_inf,
        )
