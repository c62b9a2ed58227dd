"""The Triton backend: a fixed number of launches per (param group, dtype) bucket, whatever the tensor count.

first_step:   norm partials (1 launch per bucket) -> finalize (1 launch) -> perturb (1 per bucket)
second_step:  restore + SGD/Adam/AdamW update (1 launch per bucket; the first momentum step and
              Adam tensors at different step counts get one more each), or, for any other base
              optimizer, a restore launch per bucket followed by ``base_optimizer.step()``.

Tensors the kernels cannot index flat (a parameter that is not dense, or a gradient or state whose
strides differ from the parameter's) go through the reference ops for the perturbation and, in the
second step, send the whole step down the generic path. The norm stays on the device throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.norm import finalize, norm_programs, sq_partials
from ..kernels.perturb import perturb as perturb_kernel
from ..kernels.table import PointerTable
from ..layout import same_layout
from ..kernels.update import OPT_ADAM, OPT_RESTORE, OPT_SGD, restore_update
from . import reference
from .base import Backend, GroupWork

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch: Adam keeps its step count in the default float dtype

    def _get_scalar_dtype() -> torch.dtype:
        return torch.get_default_dtype()


_FUSED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def _by_dtype(params: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    out: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        out.setdefault(p.dtype, []).append(p)
    return out


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._tables: dict[tuple, PointerTable] = {}
        self._partials: Tensor | None = None
        self._norm: Tensor | None = None

    def invalidate(self) -> None:
        self._tables.clear()

    def _table(self, key: tuple, device: torch.device, columns: list[tuple]) -> PointerTable:
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = PointerTable()
        return table.update(device, columns)

    def _buffers(self, n_partials: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._partials is None or self._partials.numel() < n_partials or self._partials.device != device:
            self._partials = torch.empty(max(n_partials, 64), dtype=torch.float32, device=device)
        if self._norm is None or self._norm.device != device:
            self._norm = torch.empty((), dtype=torch.float32, device=device)
        return self._partials, self._norm

    # ------------------------------------------------------------------ first step
    def perturb(self, work: list[GroupWork]) -> Tensor:
        device = self.norm_device(work)
        buckets = []
        slow = []
        for gw in work:
            fast = []
            for p in gw.params:
                if same_layout(p, p.grad, self.backup_for(p)):
                    fast.append(p)
                else:
                    slow.append((gw.group, p))
            for dtype, ps in _by_dtype(fast).items():
                cols = [(p, p.grad, self.backups[p]) for p in ps]
                buckets.append((self._table(("perturb", tuple(map(id, ps))), device, cols), dtype, gw.group))
        counts = [norm_programs(t) for t, _, _ in buckets]
        partials, norm = self._buffers(sum(counts) + 1, device)
        off = 0
        for (table, dtype, group), k in zip(buckets, counts):
            sq_partials(table, partials[off:], dtype, group["adaptive"], group["eta"])
            off += k
        if slow:
            partials[off : off + 1].copy_(reference.grad_sq_sum(slow, device).reshape(1))
            off += 1
        finalize(partials, off, norm)
        for table, dtype, group in buckets:
            perturb_kernel(table, norm, dtype, group["rho"], group["adaptive"], group["eta"])
        for group, p in slow:
            reference.perturb_(group, p, self.backups[p], norm)
        return norm

    # ------------------------------------------------------------------ second step
    def _restore(self, params: list[Tensor]) -> None:
        """Bit-exact restore, one launch per dtype for the flat-indexable tensors."""
        if not params:
            return
        device = params[0].device
        fast = [p for p in params if same_layout(p, self.backups[p])]
        for dtype, ps in _by_dtype(fast).items():
            table = self._table(("restore", tuple(map(id, ps))), device, [(p, None, self.backups[p]) for p in ps])
            restore_update(table, dtype, OPT_RESTORE)
        fast_ids = {id(p) for p in fast}
        for p in params:
            if id(p) not in fast_ids:
                p.detach().copy_(self.backups[p])

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
                perturbed = id(p) in perturbed_ids
                staged = not same_layout(p)
                dst = self.backup_for(p) if staged else p
                src = self.backups[p] if perturbed else dst
                st = state.get(p, {})
                tensors = [v for k, v in st.items() if k != "step" and isinstance(v, Tensor)]
                step = st.get("step")
                if not same_layout(dst, p.grad, src, *tensors) or (
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
            self._restore(perturbed)
            self.opt.base_optimizer.step()
            return
        for gw in work:
            for p in gw.params:
                dst, _, pre_copy, _ = plan[id(p)]
                if pre_copy:
                    dst.copy_(p.detach())
        for gw in work:
            for dtype, ps in _by_dtype(gw.params).items():
                if kind == "sgd":
                    self._sgd(gw.group, dtype, ps, plan)
                else:
                    self._adam(gw.group, dtype, ps, plan)
        for gw in work:
            for p in gw.params:
                dst, _, _, post_copy = plan[id(p)]
                if post_copy:
                    p.detach().copy_(dst)
        self._restore([p for p in perturbed if id(p) not in plan])

    def _columns(self, ps: list[Tensor], plan: dict[int, tuple], *state_keys: str) -> list[tuple]:
        state = self.opt.base_optimizer.state
        return [(plan[id(p)][0], p.grad, plan[id(p)][1], *(state[p][k] for k in state_keys)) for p in ps]

    def _sgd(self, group: dict, dtype: torch.dtype, ps: list[Tensor], plan: dict[int, tuple]) -> None:
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
            for p in first:  # torch starts the buffer at the first gradient; the kernel writes it
                state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            first_ids = {id(p) for p in first}
            parts = [(True, first), (False, [p for p in ps if id(p) not in first_ids])]
        for is_first, sub in parts:
            if sub:
                table = self._table(("sgd", is_first, tuple(map(id, sub))), sub[0].device,
                                    self._columns(sub, plan, *keys))
                restore_update(table, dtype, OPT_SGD, first=is_first, **hyper)

    def _adam(self, group: dict, dtype: torch.dtype, ps: list[Tensor], plan: dict[int, tuple]) -> None:
        base = self.opt.base_optimizer
        by_step: dict[float, list[Tensor]] = {}
        for p in ps:
            st = base.state[p]
            if len(st) == 0:  # as torch.optim.Adam initializes its state
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            by_step.setdefault(float(st["step"]), []).append(p)
        decoupled = group.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW))
        for step, sub in by_step.items():
            table = self._table(("adam", tuple(map(id, sub))), sub[0].device,
                                self._columns(sub, plan, "exp_avg", "exp_avg_sq"))
            restore_update(
                table, dtype, OPT_ADAM, lr=group["lr"], weight_decay=group["weight_decay"],
                betas=group["betas"], eps=group["eps"], step=step, decoupled=decoupled,
                maximize=group["maximize"],
            )
