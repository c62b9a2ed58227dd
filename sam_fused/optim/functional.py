"""``FunctionalSAM``: Functional-SAM (Singh, Mobahi, Agarwala and Dauphin, "Avoiding spurious
sharpness minimization broadens applicability of SAM", ICML 2025, arXiv 2502.02407).

SAM's gradient at the perturbed point splits by the chain rule into a *functional* path (the
network's Jacobian moves with the perturbation) and a *logit* path (the loss derivative with
respect to the outputs moves). In language models SAM is dominated by the logit path, which
regularizes the logits' statistics rather than the function; Functional-SAM keeps the functional
path alone (the paper's update, its Section 4):

    e   = rho * g / ||g||,                 g = dL/dw at w
    g_F = J(w + e)^T  dL/dF(w)             J: the Jacobian of the outputs F with respect to w
    w  <- base optimizer step with g_F

so the second pass backpropagates the outputs at ``w + e`` with the output gradient saved from
the first pass (one vector-Jacobian product: the cost of SAM's second backward, without the loss
head's). Everything else is :class:`~sam_fused.FusedSAM`'s: the fused perturb pass (norm, backup,
``w + e`` in one pass), the fused restore + update, ASAM (``adaptive``), the schedules, phases and
``perturb=False`` groups, GradScaler, checkpoints and refusals.

The paper's preconditioned perturbation, ``precondition=True`` (Adam/AdamW bases): ``e = rho *
P^-1 g / ||P^-1 g||`` with ``P`` Adam's denominator (see :class:`~sam_fused.FusedSAM`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .base import _eager, _unwrapping
from .sam import FusedSAM


def split_outputs(out, where: str, who: str = "FunctionalSAM") -> tuple[Tensor, Tensor]:
    """(loss, outputs) of a closure call, or a clear error naming ``who`` (the optimizer)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"{who}'s closure must return (loss, outputs): the loss and the network's outputs it was computed "
            f"from (the logits), without calling backward(); {where} returned {type(out).__name__}")
    loss, outputs = out
    if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise ValueError(f"{who}: the loss ({where}) must be a one-element tensor that requires grad")
    if not (isinstance(outputs, Tensor) and outputs.requires_grad):
        raise ValueError(f"{who}: the outputs ({where}) must be a tensor that requires grad (the logits the "
                         "loss was computed from, not detached)")
    return loss, outputs


_split = split_outputs


def next_saved(saved: list[Tensor], replayed: int, outputs, who: str = "FunctionalSAM") -> Tensor:
    """The saved ``dL/doutputs`` the second pass's ``outputs`` (at w + e) pair with: the next
    micro-batch's, or a clear error (more second passes than first ones, or outputs that do not
    require grad or have another shape)."""
    if replayed >= len(saved):
        raise RuntimeError(f"{who}.second_backward() called more often than the first pass had micro-batches "
                           f"({len(saved)})")
    if not isinstance(outputs, Tensor) or not outputs.requires_grad:
        raise ValueError(f"{who}: the outputs at w + e must be a tensor that requires grad")
    if outputs.shape != saved[replayed].shape:
        raise ValueError(f"{who}: the outputs at w + e have shape {tuple(outputs.shape)}, the first pass's "
                         f"{tuple(saved[replayed].shape)}: the same inputs must go through both passes")
    return saved[replayed]


class FunctionalSAM(FusedSAM):
    """Functional-SAM around any base optimizer (module docstring for the rule).

    Args: as :class:`~sam_fused.FusedSAM` (``rho``, ``adaptive``, ``eta``, ``backend``,
    ``interval``, ``sam_probability``, ``seed``, ``phase``, ``**base_kwargs``).

    ``step(closure)``: ``closure()`` runs the forward only and returns ``(loss, outputs)``
    (``outputs``: the logits, any shape), calling no ``backward()`` (nor ``zero_grad()``: the
    optimizer clears the gradients before its first backward). The optimizer takes
    ``dL/doutputs`` and the first gradient from the first call, perturbs, calls the closure again
    at ``w + e`` and backpropagates its outputs with the saved ``dL/doutputs``, restores, updates;
    it returns the loss of the first call. ``max_grad_norm`` clips the update gradient ``g_F``
    (``torch.nn.utils.clip_grad_norm_``) before the update.

    By hand (a loop that cannot hand over a closure)::

        opt.zero_grad()
        loss, logits = forward(batch)
        opt.first_step(loss, logits)            # dL/dlogits saved, g backpropagated, w -> w + e
        _, logits = forward(batch)              # at w + e
        opt.second_step(logits)                 # g_F backpropagated, restore, update

    With gradient accumulation, ``accumulate(loss_i, outputs_i)`` per micro-batch, then
    ``first_step()``; at ``w + e``, ``second_backward(outputs_i)`` for the micro-batches in the same
    order, then ``second_step()``. With a GradScaler, hand over the scaled loss
    (``first_step(scaler.scale(loss), logits, grad_scaler=scaler)``), then
    ``second_backward(logits)`` and ``scaler.step(opt)``; to clip, ``scaler.unscale_(opt)`` and
    clip between them. bf16 autocast needs nothing more. The saved output gradients take the
    memory of the outputs (one logits-sized tensor per micro-batch) until the second pass.
    """

    def __init__(self, params: Iterable, base_optimizer: type = torch.optim.AdamW, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.0, backend: str | None = None,
                 max_grad_norm: float | None = None, **kwargs) -> None:
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and not isinstance(
                max_grad_norm, bool) and 0.0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite positive number or None, got {max_grad_norm!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, backend=backend, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._saved: list[Tensor] = []  # dL/doutputs of each micro-batch of the first pass
        self._replayed = 0  # micro-batches backpropagated at w + e

    # ------------------------------------------------------------------ the passes
    def accumulate(self, loss: Tensor, outputs: Tensor) -> None:
        """One micro-batch of the first pass: save ``dL/doutputs`` and backpropagate it (the
        first gradient accumulates in ``.grad`` as a plain backward's would)."""
        if self._perturbed is not None:
            raise RuntimeError("accumulate() is the first pass: the parameters are perturbed (call second_step() or "
                               "restore() first)")
        loss, outputs = _split((loss, outputs), "accumulate()")
        with torch.enable_grad():
            (d_out,) = torch.autograd.grad(loss, outputs, retain_graph=True)
            outputs.backward(d_out)
        self._saved.append(d_out.detach())

    @_unwrapping
    def first_step(self, loss: Tensor | None = None, outputs: Tensor | None = None, zero_grad: bool = True, *,
                   grad_scaler: "torch.amp.GradScaler | None" = None) -> None:
        """``accumulate(loss, outputs)`` when given, then FusedSAM's first step (the gradients are
        cleared for the second pass unless ``zero_grad=False``). Refused, with nothing written,
        without a saved micro-batch."""
        if loss is not None or outputs is not None:
            self.accumulate(loss, outputs)
        if not self._saved:
            raise RuntimeError("FunctionalSAM.first_step(loss, outputs): no output gradient was saved (hand the loss and "
                               "the outputs over, or call accumulate() per micro-batch first)")
        try:
            super().first_step(zero_grad, grad_scaler=grad_scaler)
        except BaseException:
            if self._perturbed is None:
                self._saved = []
            raise
        self._replayed = 0
        if self._perturbed is None:  # a plain step of the schedule: nothing to replay
            self._saved = []

    def second_backward(self, outputs: Tensor) -> None:
        """At ``w + e``: backpropagate ``outputs`` with the saved ``dL/doutputs`` of the next
        micro-batch (in the order of the first pass): ``.grad += J(w + e)^T dL/dF(w)``."""
        if self._perturbed is None:
            raise RuntimeError("second_backward() comes after first_step()")
        saved = next_saved(self._saved, self._replayed, outputs)
        with torch.enable_grad():
            outputs.backward(saved.to(outputs.dtype))
        self._replayed += 1

    @_unwrapping
    @_eager
    def second_step(self, outputs: Tensor | None = None, zero_grad: bool = False, *, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
        """``second_backward(outputs)`` when given, then FusedSAM's second step (restore, update).
        Refused, with the parameters still perturbed, when the second pass did not replay every
        micro-batch of the first."""
        if outputs is not None and not self.__dict__.get("_plain_done"):
            self.second_backward(outputs)
        if self._perturbed is not None and self._replayed != len(self._saved):
            raise RuntimeError(f"second_step(): the second pass backpropagated {self._replayed} of the first pass's "
                               f"{len(self._saved)} micro-batches; the parameters stay perturbed until the rest are "
                               "(second_backward) or restore()")
        super().second_step(zero_grad, grad_scale=grad_scale, found_inf=found_inf)
        self._saved, self._replayed = [], 0

    def _end_step(self) -> None:
        super()._end_step()
        self._saved, self._replayed = [], 0

    # ------------------------------------------------------------------ step(closure)
    def _step(self, closure: Callable[[], tuple] | None) -> Tensor | None:
        if closure is None or hasattr(self, "found_inf"):
            return super()._step(closure)  # the second step of a hand-written loop, or scaler.step(opt)
        closure = torch.enable_grad()(closure)
        self._check_groups()
        if self._perturbed is not None:
            raise RuntimeError("step(closure) between first_step() and second_step(): call second_step() or restore()")
        loss, outputs = _split(closure(), "the closure's first call")
        self.zero_grad()  # the closure runs no backward: clearing the last step's gradients is the optimizer's
        if not self.sam_due():  # a plain step of the schedule: the gradient at w
            with torch.enable_grad():
                loss.backward()
            self._clip()
            self._plain_step()
            self._end_step()
            self._count_step()
            self._opt_called = True
            return loss
        self._saved = []
        self.accumulate(loss, outputs)
        super().first_step(zero_grad=True)
        self._replayed = 0
        try:
            with self._frozen_stats():
                _, outputs2 = _split(closure(), "the closure's second call (at w + e)")
                self.second_backward(outputs2)
            self._clip()
            super().second_step()
        except BaseException:
            self.restore()
            self._saved, self._replayed = [], 0
            raise
        self._saved, self._replayed = [], 0
        return loss

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_saved"], state["_replayed"] = [], 0
        return state
