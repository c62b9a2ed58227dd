"""What the fused update knows of torch.optim's SGD, Adam and AdamW state: which base optimizers
it fuses, which state tensors each keeps, and the checks that a parameter's state fits it (made
before anything is written)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import OPT_ADAM, OPT_SGD
from ..plan import StepPlan
from ..update_scalars import UpdateScalars

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch: Adam keeps its step count in the default float dtype

    def _get_scalar_dtype() -> torch.dtype:
        return torch.get_default_dtype()

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


def init_state(kind: str, st: dict, p: Tensor) -> None:
    """Create the state torch.optim would create at a parameter's first step: SGD's momentum buffer
    (zeros: the kernels write ``0 * 0 + 1 * g`` there, with no branch, as torch starts it at the
    first gradient; Momentum-SAM's authors start it at zero too), Adam's step count and moments.
    Under FSDP2 ``p`` is a DTensor and so is its state, sharded like it, as torch.optim keeps it."""
    t = p.detach()
    if kind == "sgd":
        st["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.preserve_format)
    else:
        st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def update_scalars(kind: str, group: dict, base: torch.optim.Optimizer, step: float = 1.0,
                   first: bool = False) -> UpdateScalars:
    """The fused update of one param group of ``base`` (SGD, Adam or AdamW; for Adam, at the step
    count ``step`` after its increment; for SGD, ``first``: no momentum buffer yet)."""
    if kind == "sgd":
        return UpdateScalars(OPT_SGD, lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                             dampening=group.get("dampening", 0.0), nesterov=group.get("nesterov", False),
                             maximize=group.get("maximize", False), first=first)
    beta1, beta2 = group["betas"]
    return UpdateScalars(OPT_ADAM, lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                         eps=group["eps"], step=step, maximize=group.get("maximize", False),
                         decoupled=group.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW)))


def check_checkpoint_state(base: torch.optim.Optimizer, state_dict: dict) -> None:
    """For SGD, Adam and AdamW: every parameter's state in a checkpoint is the state ``base`` keeps
    (before anything is loaded: torch.optim would fail half-way with a bare KeyError)."""
    kind = FUSED_KINDS.get(type(base))
    if kind is None:
        return
    needed = {"sgd": (), "adam": ("step", "exp_avg", "exp_avg_sq")}[kind]
    allowed = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}[kind]
    for index, st in state_dict.get("state", {}).items():
        if st and (any(k not in st for k in needed) or not set(st) <= allowed):
            raise ValueError(
                f"this checkpoint's state of parameter {index} has {sorted(st)}, not the state of "
                f"{type(base).__name__}: was it saved by another optimizer?"
            )
