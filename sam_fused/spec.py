"""The scalar arguments of a fused restore + update, derived once on the host for every backend.

Formulas are ``torch.optim``'s (SGD; Adam/AdamW without amsgrad), with its bias corrections
computed in Python floats from the host-side step count exactly as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

OPT_RESTORE = 0  # w = backup
OPT_SGD = 1
OPT_ADAM = 2


@dataclass(frozen=True)
class Update:
    opt: int
    lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    first: bool = False  # SGD: no momentum buffer yet, the kernel starts it at the gradient
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: float = 1.0  # Adam: the step count after its increment
    decoupled: bool = False  # AdamW's weight decay

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step) if self.opt == OPT_ADAM else 1.0

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5 if self.opt == OPT_ADAM else 1.0

    @property
    def decay(self) -> float:
        """AdamW's multiplicative weight decay ``1 - lr * weight_decay``."""
        return 1.0 - self.lr * self.weight_decay
