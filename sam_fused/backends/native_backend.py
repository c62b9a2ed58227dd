"""The native backends: C++ kernels from ``csrc/`` on the CPU ("cpu") and on CUDA ("cuda").

A bucket is handed over as tensor lists; the CPU kernels walk it in parallel chunks (one pass per
fused operation), the CUDA kernels through a multi-tensor apply (a few launches per bucket).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import Update
from .flat import Bucket, FlatBackend


def _column(bucket: Bucket, k: int) -> list[Tensor]:
    if len(bucket.columns[0]) <= k or bucket.columns[0][k] is None:
        return []
    return [c[k] for c in bucket.columns]


class NativeBackend(FlatBackend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def __init__(self, optimizer, module, name: str) -> None:
        super().__init__(optimizer)
        self._C = module
        self.name = name
        if name == "cuda":
            self.dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def launch_norm(self, buckets, slow_sq, device) -> Tensor:
        parts = [
            self._C.sq_sum(_column(b, 0), _column(b, 1), adaptive=bool(g["adaptive"]), eta=float(g["eta"]))
            for b, g in buckets
        ]
        if slow_sq is not None:
            parts.append(slow_sq.reshape(()).to(torch.float32))
        if not parts:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(parts).sum().sqrt() if len(parts) > 1 else parts[0].sqrt()

    def launch_perturb(self, bucket: Bucket, group: dict, norm: Tensor) -> None:
        self._C.perturb_(_column(bucket, 0), _column(bucket, 1), _column(bucket, 2), norm=norm,
                         rho=float(group["rho"]), adaptive=bool(group["adaptive"]), eta=float(group["eta"]))

    def launch_update(self, bucket: Bucket, u: Update) -> None:
        self._C.restore_update_(
            _column(bucket, 0), _column(bucket, 1), _column(bucket, 2), _column(bucket, 3), _column(bucket, 4),
            opt=u.opt, lr=float(u.lr), weight_decay=float(u.weight_decay), momentum=float(u.momentum),
            dampening=float(u.dampening), nesterov=bool(u.nesterov), maximize=bool(u.maximize), first=bool(u.first),
            beta1=float(u.beta1), beta2=float(u.beta2), eps=float(u.eps), step_size=float(u.step_size),
            bias_correction2_sqrt=float(u.bias_correction2_sqrt), decay=float(u.decay), decoupled=bool(u.decoupled),
        )
