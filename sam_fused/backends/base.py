"""What every backend shares: the work list handed over by ``FusedSAM`` and the backup buffers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..layout import preserved_strides


@dataclass
class GroupWork:
    """The parameters of one param group that have a gradient in this step, in group order."""

    index: int
    group: dict
    params: list[Tensor] = field(default_factory=list)


class Backend:
    """Base of the backends: owns the backup of each perturbed parameter.

    ``perturb(work)`` must fill ``self.backups[id(p)]`` with an exact copy of every ``p`` it perturbs and
    return the global norm as a 0-dim fp32 device tensor; ``restore_and_update(perturbed)`` must put
    those backups back bit-identically and apply the base optimizer with the current gradients.
    Neither may synchronize with the device.
    """

    name = "base"

    def __init__(self, optimizer) -> None:
        self.opt = optimizer
        self.backups: dict[int, Tensor] = {}  # id(param) -> its backup (a Tensor key hashes slowly)

    def backup_for(self, p: Tensor) -> Tensor:
        """The backup buffer of ``p``: allocated on first use with ``p``'s layout, then reused."""
        b = self.backups.get(id(p))
        if (
            b is None
            or b.shape != p.shape
            or b.dtype != p.dtype
            or b.device != p.device
            or b.stride() != preserved_strides(p)
        ):
            b = torch.empty_like(p, memory_format=torch.preserve_format).detach()
            self.backups[id(p)] = b
        return b

    @staticmethod
    def norm_device(work: list[GroupWork]) -> torch.device:
        return work[0].params[0].device

    def invalidate(self) -> None:
        """Parameters, groups or optimizer state were replaced: drop anything cached about them."""

    def perturb(self, work: list[GroupWork]) -> Tensor:
        raise NotImplementedError

    def restore_and_update(self, perturbed: list[Tensor], work: list[GroupWork]) -> None:
        raise NotImplementedError
