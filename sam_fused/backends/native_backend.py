"""The native backends: C++ kernels from ``csrc/`` on the CPU ("cpu") and on CUDA ("cuda").

A bucket is handed over as tensor lists; the CPU kernels walk it in parallel chunks (one pass per
fused operation), the CUDA kernels through a multi-tensor apply (a few launches per bucket).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import Bucket, Buffers
from ..update_scalars import UpdateScalars
from ..constants import CHUNK
from .amp import Amp
from .base import Combo
from .fused import FusedBackend


class NativeBackend(FusedBackend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def __init__(self, optimizer, module, name: str) -> None:
        if name == "cuda":
            self.dtypes = (torch.float32, torch.bfloat16, torch.float16)
        super().__init__(optimizer)
        self._C = module
        self.name = name
        self.precondition_kernels = True  # the preconditioned norm and perturbation (csrc: precond, bc2_inv)
        self._partials: dict[torch.dtype, Tensor] = {}

    def _scratch(self, buckets: list[Bucket], width: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor | None:
        """CUDA: one scratch buffer per dtype (fp64 for the norm, fp32 for the dot products),
        ``width`` values per block of the largest bucket, kept, so that a steady-state step
        allocates nothing (the CPU kernels need none)."""
        if device.type != "cuda":
            return None
        need = width * max((_chunks(b) for b in buckets), default=1)
        have = self._partials.get(dtype)
        if have is None or have.numel() < need or have.device != device:
            have = self._partials[dtype] = torch.empty(max(need, 64), dtype=dtype, device=device)
        return have

    def launch_sq(self, buckets: list[Bucket], extra: Tensor | None, sq: Tensor, norm: Tensor,
                  inv_scale: Tensor | None, pre: list | None = None) -> None:
        scratch = self._scratch(buckets, 1, sq.device, torch.float64)
        for i, b in enumerate(buckets):
            g = b.group
            if pre is not None and pre[i] is not None:  # eta carries Adam's eps
                self._C.sq_sum_(sq, b.params, b.grads(), adaptive=False, eta=pre[i][1], accumulate=i > 0,
                                inv_scale=inv_scale, partials=scratch, precond=b.state2, bc2_inv=pre[i][0])
                continue
            self._C.sq_sum_(sq, b.params, b.grads(), adaptive=bool(g["adaptive"]), eta=float(g["eta"]),
                            accumulate=i > 0, inv_scale=inv_scale, partials=scratch)
        if not buckets:
            sq.zero_()
        if extra is not None:
            sq.add_(extra)
        torch.sqrt(sq, out=norm)

    def launch_dots(self, buckets: list[Bucket], aux: Buffers, out: Tensor, inv_scale: Tensor | None) -> None:
        scratch = self._scratch(buckets, 3, out.device)
        for i, b in enumerate(buckets):
            self._C.dots_(out, b.grads(), b.buffers(aux), accumulate=i > 0, inv_scale=inv_scale, partials=scratch)
        if not buckets:
            out.zero_()

    def launch_perturb(self, bucket: Bucket, norm: Tensor,
                       inv_scale: Tensor | None, save: Buffers | None = None, pre=None) -> None:
        g = bucket.group
        if pre is not None:  # the preconditioned perturbation (eta carries Adam's eps)
            self._C.perturb_(bucket.params, bucket.grads(), bucket.backups, [], norm=norm, rho=float(g["rho"]),
                             adaptive=False, eta=pre[1], inv_scale=inv_scale, precond=bucket.state2, bc2_inv=pre[0])
            return
        self._C.perturb_(bucket.params, bucket.grads(), bucket.backups,
                         [] if save is None else bucket.buffers(save), norm=norm, rho=float(g["rho"]),
                         adaptive=bool(g["adaptive"]), eta=float(g["eta"]), inv_scale=inv_scale)

    def launch_update(self, bucket: Bucket, u: UpdateScalars, amp: Amp | None, combo: Combo | None = None) -> None:
        inv_scale, found_inf = amp if amp is not None else (None, None)
        combine, aux, coef = 0, [], None
        if combo is not None and u.opt:
            combine, aux, coef = 2 if combo.write else 1, bucket.buffers(combo.aux), combo.coef[bucket.index]
        state1, state2 = (bucket.state1 or [], bucket.state2 or []) if u.opt else ([], [])  # the restore reads no state
        self._C.restore_update_(
            bucket.params, bucket.grads() if u.opt else [], bucket.backups, state1, state2,
            aux, opt=u.opt, has_momentum=u.momentum != 0, nesterov=bool(u.nesterov), scalars=u.scalars(),
            inv_scale=inv_scale, found_inf=found_inf, combine=combine, coef=coef,
        )

    # ------------------------------------------------------------------ Momentum-SAM
    def launch_msam_update(self, bucket: Bucket, u: UpdateScalars, restore_rho: float | None, inv: Tensor,
                           amp: Amp | None, sq: Tensor, accumulate: bool) -> None:
        inv_scale, found_inf = amp if amp is not None else (None, None)
        self._C.msam_update_(
            sq, bucket.params, bucket.grads(), bucket.state1, bucket.state2 or [], opt=u.opt, scalars=u.scalars(),
            restore=restore_rho is not None, rho=0.0 if restore_rho is None else float(restore_rho), inv=inv.reshape(1),
            accumulate=accumulate,
            inv_scale=inv_scale, found_inf=found_inf, partials=self._scratch([bucket], 1, sq.device, torch.float64),
        )

    def launch_msam_perturb(self, bucket: Bucket, inv_next: Tensor, amp: Amp | None) -> None:
        self._C.msam_perturb_(bucket.params, bucket.state1, rho=float(bucket.group["rho"]), inv_next=inv_next.reshape(1),
                              found_inf=None if amp is None else amp[1])


def _chunks(bucket: Bucket) -> int:
    """Blocks of the CUDA kernels over the bucket (65536 elements each), counted once per version."""
    cached = bucket.cache.get("cuda_chunks")
    if cached is None or cached[0] != bucket.version:
        n = sum(-(-p.numel() // CHUNK) for p in bucket.params)
        cached = bucket.cache["cuda_chunks"] = (bucket.version, n)
    return cached[1]
