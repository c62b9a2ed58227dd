"""What the fused backends share: buckets of flat-indexable tensors, and when the fused update applies.

A fused backend walks every tensor of a bucket (one param group, one dtype) as a flat array, so it
only has to supply three launches per bucket; this class decides everything else:

first_step:   the norm over every bucket (plus the reference's sum of squares for the tensors that
              cannot be indexed flat), then a perturb launch per bucket
second_step:  a restore + update launch per bucket (the first momentum step, and Adam tensors at
              other step counts, get one more each), or, for any other base optimizer, a restore
              launch per bucket followed by ``base_optimizer.step()``.

A tensor can be indexed flat when it is dense and its gradient, backup and state share its
strides. A parameter that is not dense is perturbed by the reference ops, and updated through
its backup buffer (contiguous, like the gradient and state autograd and torch.optim give it).
Anything else sends the update down the generic path. No step reads a value back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layout import is_dense, same_layout
from ..spec import OPT_ADAM, OPT_RESTORE, OPT_SGD, Update
from . import reference
from .base import Backend, GroupWork

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch: Adam keeps its step count in the default float dtype

    def _get_scalar_dtype() -> torch.dtype:
        return torch.get_default_dtype()


_FUSED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


@dataclass
class Bucket:
    """Tensors of one dtype on one device, launched together.

    ``columns[i]`` = (param or its staging buffer, grad, source/backup, state 1, state 2), with
    ``None`` for a slot the launch does not use. ``key`` identifies the tensor list across steps,
    so a backend can cache what it builds for it.
    """

    key: tuple
    dtype: torch.dtype
    device: torch.device
    columns: list[tuple]


def _by_dtype(params: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    out: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        out.setdefault(p.dtype, []).append(p)
    return out


def _bucket(kind, ps: list[Tensor], columns: list[tuple]) -> Bucket:
    return Bucket((kind, tuple(map(id, ps))), ps[0].dtype, ps[0].device, columns)


class FlatBackend(Backend):
    """Base of the fused backends; subclasses supply the three launches and their dtypes."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    # ------------------------------------------------------------------ the launches
    def launch_norm(self, buckets: list[tuple[Bucket, dict]], slow_sq: Tensor | None, device) -> Tensor:
        """sqrt(sum over buckets of (T g)^2 [+ slow_sq]) as a 0-dim fp32 device tensor; each bucket
        comes with its param group (``adaptive``, ``eta``)."""
        raise NotImplementedError

    def launch_perturb(self, bucket: Bucket, group: dict, norm: Tensor) -> None:
        raise NotImplementedError

    def launch_update(self, bucket: Bucket, update: Update) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ first step
    def flat(self, p: Tensor, *others: Tensor | None) -> bool:
        return p.dtype in self.dtypes and same_layout(p, *others)

    def perturb(self, work: list[GroupWork]) -> Tensor:
        device = self.norm_device(work)
        buckets, slow = [], []
        for gw in work:
            fast = []
            for p in gw.params:
                self.backup_for(p)  # has p's strides when p is dense: no need to check it again
                if self.flat(p, p.grad):
                    fast.append(p)
                else:
                    slow.append((gw.group, p))
            for ps in _by_dtype(fast).values():
                bucket = _bucket("perturb", ps, [(p, p.grad, self.backups[id(p)]) for p in ps])
                buckets.append((bucket, gw.group))
        slow_sq = reference.grad_sq_sum(slow, device) if slow else None
        norm = self.launch_norm(buckets, slow_sq, device)
        for bucket, group in buckets:
            self.launch_perturb(bucket, group, norm)
        for group, p in slow:
            reference.perturb_(group, p, self.backups[id(p)], norm)
        return norm

    # ------------------------------------------------------------------ second step
    def restore(self, params: list[Tensor]) -> None:
        """Bit-exact restore: one launch per dtype for the flat tensors, a copy for the others."""
        fast = [p for p in params if self.flat(p)]  # the backup shares p's layout (backup_for)
        for ps in _by_dtype(fast).values():
            self.launch_update(_bucket("restore", ps, [(p, None, self.backups[id(p)]) for p in ps]), Update(OPT_RESTORE))
        fast_ids = {id(p) for p in fast}
        for p in params:
            if id(p) not in fast_ids:
                p.detach().copy_(self.backups[id(p)])

    def _fused_kind(self) -> str | None:
        """'sgd' or 'adam' when the base optimizer and its groups can run in the fused kernel."""
        base = self.opt.base_optimizer
        kind = _FUSED.get(type(base))
        if kind is None or getattr(base, "grad_scale", None) is not None or getattr(base, "found_inf", None) is not None:
            return None
        for group in base.param_groups:
            if any(group.get(k) for k in ("fused", "capturable", "differentiable", "amsgrad")):
                return None
            hyper = [group["lr"], group["weight_decay"]]
            hyper += list(group["betas"]) if kind == "adam" else [group["momentum"], group["dampening"]]
            if any(isinstance(v, Tensor) for v in hyper):
                return None
        return kind

    def _plan(self, work: list[GroupWork], perturbed_ids: set[int]) -> dict[int, tuple] | None:
        """Where the kernel reads and writes each parameter, or None if one cannot be indexed flat.

        A dense parameter is updated in place, reading its backup (or itself, if it was not
        perturbed). A parameter that is not dense is staged through its backup buffer, which has
        the contiguous layout its gradient and state get from autograd and torch.optim: the kernel
        updates the backup in place and a copy puts it back into the parameter.
        """
        state = self.opt.base_optimizer.state
        plan = {}
        for gw in work:
            for p in gw.params:
                if p.dtype not in self.dtypes:
                    return None
                perturbed = id(p) in perturbed_ids
                staged = not is_dense(p)
                dst = self.backup_for(p) if staged else p
                # the backup shares dst's layout by construction (backup_for); grad and state may not
                src = self.backups[id(p)] if perturbed else dst
                st = state.get(p)
                tensors = [v for k, v in st.items() if k != "step" and isinstance(v, Tensor)] if st else ()
                step = st.get("step") if st else None
                if not same_layout(dst, p.grad, *tensors) or (
                    isinstance(step, Tensor) and step.device.type != "cpu"
                ):
                    return None
                plan[id(p)] = (dst, src, staged and not perturbed, staged)
        return plan

    def restore_and_update(self, perturbed: list[Tensor], work: list[GroupWork]) -> None:
        perturbed_ids = {id(p) for p in perturbed}
        kind = self._fused_kind()
        plan = None if kind is None else self._plan(work, perturbed_ids)
        if plan is None:
            self.restore(perturbed)
            self.opt.base_optimizer.step()
            return
        params = [p for gw in work for p in gw.params]
        for p in params:
            dst, _, pre_copy, _ = plan[id(p)]
            if pre_copy:
                dst.copy_(p.detach())
        for gw in work:
            for ps in _by_dtype(gw.params).values():
                (self._sgd if kind == "sgd" else self._adam)(gw.group, ps, plan)
        for p in params:
            dst, _, _, post_copy = plan[id(p)]
            if post_copy:
                p.detach().copy_(dst)
        self.restore([p for p in perturbed if id(p) not in plan])

    def _columns(self, ps: list[Tensor], plan: dict[int, tuple], *state_keys: str) -> list[tuple]:
        state = self.opt.base_optimizer.state
        return [(plan[id(p)][0], p.grad, plan[id(p)][1], *(state[p][k] for k in state_keys)) for p in ps]

    def _sgd(self, group: dict, ps: list[Tensor], plan: dict[int, tuple]) -> None:
        state = self.opt.base_optimizer.state
        hyper = dict(
            lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
        )
        keys: tuple[str, ...] = ()
        parts = [(False, ps)]
        if group["momentum"] != 0:
            keys = ("momentum_buffer",)
            first = [p for p in ps if state[p].get("momentum_buffer") is None]
            for p in first:  # torch starts the buffer at the first gradient; the kernels write it
                # (zeros: the native kernels compute 0 * 0 + 1 * g there, with no branch)
                state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            first_ids = {id(p) for p in first}
            parts = [(True, first), (False, [p for p in ps if id(p) not in first_ids])]
        for is_first, sub in parts:
            if sub:
                bucket = _bucket(("sgd", is_first), sub, self._columns(sub, plan, *keys))
                self.launch_update(bucket, Update(OPT_SGD, first=is_first, **hyper))

    def _adam(self, group: dict, ps: list[Tensor], plan: dict[int, tuple]) -> None:
        base = self.opt.base_optimizer
        by_step: dict[float, list[Tensor]] = {}
        for p in ps:
            st = base.state[p]
            if len(st) == 0:  # as torch.optim.Adam initializes its state
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [base.state[p]["step"] for p in ps]
        torch._foreach_add_(steps, 1.0)  # host-side CPU scalars, as torch keeps them: no device sync
        for p, step in zip(ps, torch.stack(steps).tolist()):
            by_step.setdefault(step, []).append(p)
        decoupled = group.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW))
        beta1, beta2 = group["betas"]
        for step, sub in by_step.items():
            bucket = _bucket("adam", sub, self._columns(sub, plan, "exp_avg", "exp_avg_sq"))
            self.launch_update(bucket, Update(
                OPT_ADAM, lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                eps=group["eps"], step=step, decoupled=decoupled, maximize=group["maximize"],
            ))
