"""What the fused update knows of torch.optim's SGD, Adam and AdamW state: which base optimizers
it fuses, which state tensors each keeps, and the checks that a parameter's state fits it (made
before anything is written)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import StepPlan

FUSED_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def state_keys(kind: str, group: dict) -> tuple[str, ...]:
    """The state tensors of a parameter that the fused update reads and writes (SGD without
    momentum keeps none)."""
    if kind == "sgd":
        return ("momentum_buffer",) if group["momentum"] else ()
    return ("exp_avg", "exp_avg_sq")


def check_state(kind: str, p: Tensor, st: dict, keys: tuple[str, ...] | None = None) -> None:
    """The (non-empty) optimizer state ``st`` of ``p`` fits it: every key present, every tensor of
    p's shape, dtype and device. Raises a clear error otherwise (before anything is written)."""
    if keys is None:
        keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
    needed = ("step",) + keys if kind == "adam" else keys
    missing = [k for k in needed if k not in st or (kind == "sgd" and st[k] is None)]
    if missing and not (kind == "sgd" and set(st) <= {"momentum_buffer"}):
        raise RuntimeError(
            f"the optimizer state of a parameter of shape {tuple(p.shape)} has {sorted(st)} but lacks {missing}: "
            "was it loaded from a checkpoint of another optimizer?"
        )
    for key in keys:
        t = st.get(key)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            what = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else repr(type(t))
            raise RuntimeError(
                f"optimizer state {key!r} of a parameter of shape {tuple(p.shape)} {p.dtype} on {p.device} is "
                f"{what}: it does not fit the parameter (a checkpoint of another model?)"
            )


def check_all_state(opt, plan: StepPlan) -> None:
    """For SGD, Adam and AdamW base optimizers: ``check_state`` of every parameter with a grad."""
    base = opt.base_optimizer
    kind = FUSED_KINDS.get(type(base))
    if kind is None:
        return
    pairs = [(b.group, p) for b in plan.buckets for p in b.owners] + [(g, p) for g, p, _ in plan.slow]
    for group, p in pairs:
        st = base.state.get(p)
        if st:
            check_state(kind, p, st, state_keys(kind, group))
