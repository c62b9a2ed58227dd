"""The reference backend: plain PyTorch, any device, the oracle every fast path is checked against.

SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021) first step, per parameter ``w`` with
gradient ``g`` and the hyperparameters of its param group:

    T     = |w| + eta         (ASAM)      T = 1  (SAM)
    norm  = || T * g ||_2     over every parameter with a grad, in every group, in fp32
    e     = rho * T^2 * g / (norm + 1e-12)
    w    <- w + e             (skipped, weights untouched, when norm is not finite)

The second step copies the backup back (bit-exact) and runs ``base_optimizer.step()``.
Every operation here is an ordinary torch op on one tensor, written to be read, not to be fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Backend, GroupWork

EPS = 1e-12


def weighted_grad(p: Tensor, group: dict) -> Tensor:
    """``T * g`` in fp32: the quantity whose global L2 norm scales the perturbation."""
    g = p.grad.float()
    if group["adaptive"]:
        g = g * (p.detach().float().abs() + group["eta"])
    return g


def grad_sq_sum(pairs: list[tuple[dict, Tensor]], device: torch.device) -> Tensor:
    """Sum of squares of the weighted gradients, an fp32 0-dim tensor on ``device``."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group, p in pairs:
        total += weighted_grad(p, group).square().sum().to(device)
    return total


def perturb_(group: dict, p: Tensor, backup: Tensor, norm: Tensor) -> None:
    """Copy ``p`` into ``backup``, then ``p += e``; ``p`` is left as it was if ``norm`` is not finite."""
    backup.copy_(p.detach())
    norm = norm.to(p.device)
    ok = torch.isfinite(norm)
    scale = torch.where(ok, group["rho"] / (norm + EPS), torch.zeros_like(norm))
    w = p.detach().float()
    g = p.grad.float()
    if group["adaptive"]:
        t = w.abs() + group["eta"]
        e = t * t * g * scale
    else:
        e = g * scale
    p.detach().copy_(torch.where(ok, w + e, w))


class TorchBackend(Backend):
    """Pure-PyTorch reference: one op per tensor, the base optimizer's own ``step()`` for the update."""

    name = "torch"

    def perturb(self, work: list[GroupWork]) -> Tensor:
        pairs = [(w.group, p) for w in work for p in w.params]
        norm = grad_sq_sum(pairs, self.norm_device(work)).sqrt()
        for group, p in pairs:
            perturb_(group, p, self.backup_for(p), norm)
        return norm

    def restore(self, params: list[Tensor]) -> None:
        for p in params:
            p.detach().copy_(self.backups[id(p)])

    def restore_and_update(self, perturbed: list[Tensor], work: list[GroupWork]) -> None:
        self.restore(perturbed)
        self.opt.base_optimizer.step()
