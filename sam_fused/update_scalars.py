"""The scalar arguments of a fused restore + update, derived and folded once on the host for both
kernel families (Triton and C++), so that their element code has no data-dependent branch.

Formulas are ``torch.optim``'s (SGD; Adam/AdamW without amsgrad), with its bias corrections
computed in Python floats from the host-side step count exactly as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import OPT_ADAM, OPT_SGD, UPDATE_SCALARS


@dataclass(frozen=True)
class UpdateScalars:
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

    def scalars(self) -> tuple[float, ...]:
        """The folded scalars named by ``constants.UPDATE_SCALARS``: maximize as a sign, weight decay
        as L2 (``l2``) or decoupled (``decay``), and SGD's first momentum step as ``keep = 0,
        coef = 1`` (the buffer starts zeroed, so ``m = d`` as torch starts it)."""
        sgd = self.opt == OPT_SGD
        decoupled = self.opt == OPT_ADAM and self.decoupled
        values = dict(
            sign=-1.0 if self.maximize else 1.0, lr=self.lr, l2=0.0 if decoupled else self.weight_decay,
            decay=self.decay if decoupled else 1.0, momentum=self.momentum,
            keep=0.0 if (sgd and self.first) else self.momentum,
            coef=1.0 if (sgd and self.first) else 1.0 - self.dampening,
            one_minus_beta1=1.0 - self.beta1, beta2=self.beta2, one_minus_beta2=1.0 - self.beta2, eps=self.eps,
            step_size=self.step_size, bias_correction2_sqrt=self.bias_correction2_sqrt,
        )
        return tuple(float(values[k]) for k in UPDATE_SCALARS)
