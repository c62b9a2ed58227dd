"""Reference passes of the universal SAM class (Tahmasebi et al., ICML 2024), plain torch ops.

For samples i = 1..n with perturbation eps_i, loss L_i and gradient g_i at w + eps_i, and g0, L0
at w, the update direction is

    Frob-SAM:          g = g0 + lam / rho^2 / (n - 1) * [sum_i L_i g_i - (1/n)(sum_i L_i)(sum_i g_i)]
    Trace-, Det-SAM:   g = g0 + lam * phi'(x) * sum_i psi'(d_i) / n * (g_i - g0),
                       d_i = (L_i - L0) / rho^2,  x = (1/n) sum_i psi(d_i)

The sums are accumulated centred, as sum_i (L_i - L0)(g_i - g0) and sum_i (g_i - g0): the
bracket of Frob-SAM is a covariance, unchanged by shifting L and g by constants, and the centred
terms are small where the raw ones are large and nearly cancel (fp32 keeps the difference).

Noise: z_i ~ N(0, I) (Frob, Trace) or u_i ~ U[-h, h]^d (Det), eps_i = rho * z_i (or rho * u_i),
drawn here with a torch.Generator seeded per (seed, step, sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.utils.weak import WeakIdKeyDictionary

from ..distributed import local, shard_slices
from .base import Backend, GroupWork

MEASURES = ("frob", "trace", "det")


def sample_seed(seed: int, step: int, sample: int) -> int:
    """A 31-bit seed per (seed, step, sample): splitmix64 of their combination."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & 0x7FFFFFFF


def loss_tensor(loss, device: torch.device) -> Tensor:
    """The closure's loss as a detached fp32 0-dim tensor on ``device`` (no host synchronization)."""
    return torch.as_tensor(loss).detach().to(device=device, dtype=torch.float32).reshape(())


def sample_weights(measure: str, losses: Tensor, rho: float, n: int) -> Tensor:
    """a_i, the weight of (g_i - g0) in the accumulated sum, from losses = [L0, L1, ..., Ln]."""
    dl = losses[1:] - losses[0]
    if measure == "frob":
        return dl
    if measure == "trace":
        return torch.full_like(dl, 1.0 / n)
    return -0.5 * torch.exp(-dl / (2 * rho * rho)) / n  # det: psi'(d) / n


def combine_scale(measure: str, losses: Tensor, rho: float, lam: float, n: int) -> tuple[Tensor, Tensor]:
    """(c1, c2) with g = g0 + c1 * acc1 + c2 * acc2, acc1 = sum a_i (g_i - g0), acc2 = sum (g_i - g0)."""
    dl = losses[1:] - losses[0]
    if measure == "frob":
        k = lam / (rho * rho) / (n - 1)
        return torch.full_like(dl[0], k), -k * dl.sum() / n
    if measure == "trace":
        return torch.full_like(dl[0], lam), torch.zeros_like(dl[0])
    x = torch.exp(-dl / (2 * rho * rho)).mean()
    return lam * (-2.0 / x**3), torch.zeros_like(dl[0])


class UniversalTorchBackend(Backend):
    """Per-tensor torch ops; buffers per parameter: backup, g0, acc1 (+ acc2 for Frob-SAM)."""

    name = "torch"

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self.buffers = WeakIdKeyDictionary()  # param -> {name: buffer}: g0 and the sums, freed with the param

    def _buf(self, p: Tensor, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """A parameter-sized buffer (the local shard's size for a DTensor), allocated once (g0 in the
        parameter's dtype, sums in fp32)."""
        t = local(p)
        dtype = dtype or t.dtype
        bufs = self.buffers.get(p)
        if bufs is None:
            bufs = self.buffers[p] = {}
        b = bufs.get(key)
        if b is None or b.shape != t.shape or b.dtype != dtype or b.device != t.device:
            b = bufs[key] = torch.empty(t.shape, dtype=dtype, device=t.device)
        return b

    def noise(self, work: list[GroupWork], step: int, sample: int) -> list[Tensor]:
        """The standardized draw (z_i, or u_i in [-h, h]) of every parameter of ``work``, in order.
        For a DTensor (FSDP2) the draw is of the global shape, as in a single process, and each
        rank keeps its shard's part of it."""
        opt = self.opt
        params = [p for gw in work for p in gw.params]
        if opt.noise is not None:
            draws = opt.noise(step, sample, params)
        else:
            device = local(params[0]).device
            gen = torch.Generator(device=device).manual_seed(sample_seed(opt.seed, step, sample))
            if opt.measure == "det":
                draws = [(torch.rand(p.shape, generator=gen, device=device) * 2 - 1) * opt.h for p in params]
            else:
                draws = [torch.randn(p.shape, generator=gen, device=device) for p in params]
        out = []
        for z, p in zip(draws, params):
            where = shard_slices(p)
            z = z if where is None else z[where]
            out.append(z.to(device=local(p).device, dtype=torch.float32))
        return out

    def begin(self, work: list[GroupWork], loss: Tensor) -> None:
        self.losses = [loss_tensor(loss, self.norm_device(work))]
        for gw in work:
            for p in gw.params:
                self.backup_for(p).copy_(local(p).detach())
                self._buf(p, "g0").copy_(local(p.grad))

    def perturb(self, work: list[GroupWork], step: int, sample: int) -> None:
        zs = iter(self.noise(work, step, sample))
        for gw in work:
            for p in gw.params:
                w = self.backup_for(p).float()
                local(p).detach().copy_(w + gw.group["rho"] * next(zs))

    def accumulate(self, work: list[GroupWork], sample: int, loss: Tensor) -> None:
        self.losses.append(loss_tensor(loss, self.norm_device(work)))
        measure, n = self.opt.measure, self.opt.n_samples
        for gw in work:
            a = sample_weights(measure, torch.stack(self.losses), gw.group["rho"], n)[-1]
            for p in gw.params:
                g = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))  # no grad at w + eps: zero
                diff = g.float() - self.buffers[p]["g0"].float()
                acc1 = self._buf(p, "acc1", torch.float32)
                acc2 = self._buf(p, "acc2", torch.float32) if measure == "frob" else None
                if sample == 0:
                    acc1.copy_(a * diff)
                    if acc2 is not None:
                        acc2.copy_(diff)
                else:
                    acc1.copy_(acc1.float() + a * diff)
                    if acc2 is not None:
                        acc2.copy_(acc2.float() + diff)

    def finish(self, work: list[GroupWork]) -> None:
        """Restore every weight exactly and write the combined direction into ``p.grad``."""
        losses = torch.stack(self.losses)
        for gw in work:
            c1, c2 = combine_scale(self.opt.measure, losses, gw.group["rho"], gw.group["lam"], self.opt.n_samples)
            for p in gw.params:
                local(p).detach().copy_(self.backup_for(p))
                bufs = self.buffers[p]
                g = bufs["g0"].float() + c1 * bufs["acc1"].float()
                if self.opt.measure == "frob":
                    g = g + c2 * bufs["acc2"].float()
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                local(p.grad).copy_(g)


def extra_buffers(measure: str) -> int:
    """Parameter-sized buffers the universal SAM step keeps besides the base optimizer's state."""
    return 4 if measure == "frob" else 3
