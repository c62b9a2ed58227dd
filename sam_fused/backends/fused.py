"""The orchestration every fused backend shares: what runs in which launch, over a cached plan.

A fused backend walks every tensor of a bucket (one param group, one dtype) as a flat array, so it
only supplies three launches per bucket; this class decides everything else:

first_step:   the sum of squares over every bucket (plus the reference's for the parameters the
              kernels cannot index flat), the optional ``reduce_sq`` hook, the square root, then
              one perturb launch per bucket.
second_step:  one restore + update launch per bucket (the first momentum step, and Adam tensors
              at other step counts, get one more each), or, for any other base optimizer, one
              restore launch per bucket followed by ``base_optimizer.step()``.

A parameter that is not dense is perturbed by the reference ops and updated through its backup
buffer (dense), when its gradient and state share that buffer's strides. Anything else sends the
update down the generic path. Every state tensor the kernels will touch is checked (present, same
size, dtype and device) before the first write. In the steady state (same grads, state in place)
a step allocates nothing, uploads nothing and reads nothing back from the device.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch import Tensor

from ..constants import OPT_RESTORE
from ..layout import is_dense
from ..distributed import local
from ..plan import Bucket, Buffers, StepPlan
from ..update_scalars import UpdateScalars
from . import reference
from .amp import Amp
from .base import Backend, Combo, base_step
from .optim_state import FUSED_KINDS as _FUSED
from .optim_state import check_all_state, check_state, init_state, update_scalars
from .optim_state import state_keys as _state_keys




class FusedBackend(Backend):
    """Base of the fused backends; subclasses supply the launches and their dtypes."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._sq: Tensor | None = None
        self._norm: Tensor | None = None
        self._updates = 0  # restore_and_update calls: dates the cached Adam step counts

    # ------------------------------------------------------------------ the launches
    def launch_sq(self, buckets: list[Bucket], extra: Tensor | None, sq: Tensor, norm: Tensor,
                  inv_scale: Tensor | None, pre: list | None = None) -> None:
        """``sq = sum over buckets of (T g)^2 [+ extra]`` and ``norm = sqrt(sq)``, into the given 0-dim
        device tensors (sq fp64, so that it cannot overflow where the norm fits fp32; norm fp32); each bucket's group says ``adaptive`` and ``eta``; ``pre[i]`` (with ``precondition_kernels``), when not None: bucket i's ``(1 / sqrt(1 - beta2^t), eps)``, each ``g`` divided by Adam's denominator (state 2 the second moment); ``g`` is the
        gradient, times ``inv_scale`` (AMP) when given."""
        raise NotImplementedError

    def launch_perturb(self, bucket: Bucket, norm: Tensor,
                       inv_scale: Tensor | None, save: Buffers | None = None, pre=None) -> None:
        """``backup = w; w += e`` over the bucket; with ``save``, also ``save = g * inv_scale``; with
        ``pre`` (see ``launch_sq``), ``e`` along the preconditioned gradient."""
        raise NotImplementedError

    def launch_update(self, bucket: Bucket, update: UpdateScalars, amp: Amp | None, combo: Combo | None = None) -> None:
        """Restore + update over the bucket; with ``combo`` the gradient is ``c0 g + c1 aux`` (row
        ``bucket.index`` of ``combo.coef``) and, with ``combo.write``, aux becomes ``c2 g + c3 aux``."""
        raise NotImplementedError

    def launch_dots(self, buckets: list[Bucket], aux: Buffers, out: Tensor, inv_scale: Tensor | None) -> None:
        """``out = [sum g.g, sum g.aux, sum aux.aux]`` over the buckets, a 3-element fp32 device tensor."""
        raise NotImplementedError

    def launch_msam_update(self, bucket: Bucket, update: UpdateScalars, restore_rho: float | None, inv: Tensor,
                           amp: Amp | None, sq: Tensor, accumulate: bool) -> None:
        """Momentum-SAM's first pass over the bucket (the rules: ``backends/reference.py``, the order: ``optim/msam.py``): the restore
        ``w + restore_rho * inv * m`` (unless ``restore_rho`` is None), the update, and the sum of
        squares of the new first moments into ``sq`` (fp64; added to it with ``accumulate``)."""
        raise NotImplementedError

    def launch_msam_perturb(self, bucket: Bucket, inv_next: Tensor, amp: Amp | None) -> None:
        """``w -= rho * inv_next * m`` over the bucket (nothing when AMP found an inf)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Momentum-SAM
    def msam_prepare(self, kind: str, plan: StepPlan):
        """Check every state tensor of the plan's buckets (raises before any write); returns a
        callable that creates the missing state and returns the (bucket, update) launches, or None
        when some state tensor cannot be walked flat with its parameter (the reference ops then
        take every parameter)."""
        state = self.opt.base_optimizer.state
        fresh: list[Tensor] = []
        for bucket in plan.buckets:
            if not self._check_state(bucket, kind, state, fresh):
                return None

        def make() -> list[tuple[Bucket, UpdateScalars]]:
            for p in fresh:
                init_state(kind, state[p], p)
            launches = []
            for bucket in plan.buckets:
                self._fill_state(bucket, kind, state)
                if kind == "sgd":  # the buffers start at zero, as the authors start them: no first-step variant
                    launches.append((bucket, update_scalars(kind, bucket.group, self.opt.base_optimizer)))
                else:
                    launches += self._adam(bucket)
            return launches

        return make

    def msam_update(self, launches, inv: Tensor, inv_next: Tensor, amp: Amp | None, extra: Tensor | None,
                    device: torch.device) -> Tensor:
        if not launches:
            return reference.msam_sum(extra, inv, inv_next, amp, device)
        next_inv = reference.msam_next_inv

        sq, _ = self._scalars(device)
        for i, (bucket, update, restore_rho) in enumerate(launches):
            self.launch_msam_update(bucket, update, restore_rho, inv, amp, sq, i > 0)
        if extra is not None:
            sq.add_(extra)
        next_inv(sq, inv, None if amp is None else amp[1], out=inv_next)
        return sq

    def msam_perturb(self, bucket: Bucket, inv_next: Tensor, amp: Amp | None) -> None:
        self.launch_msam_perturb(bucket, inv_next, amp)

    # ------------------------------------------------------------------ first step
    def _scalars(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._sq is None or self._sq.device != device:
            self._sq = torch.zeros((), dtype=torch.float64, device=device)
            self._norm = torch.zeros((), dtype=torch.float32, device=device)
        return self._sq, self._norm

    precondition_kernels = False  # whether launch_sq / launch_perturb take ``pre`` (Adam's denominator)

    def perturb(self, plan: StepPlan, reduce_sq=None,
                inv_scale: Tensor | None = None, save: Buffers | None = None, precondition=None) -> Tensor:
        pre = None
        if precondition is not None:  # the Adam base's state: the preconditioned perturbation
            pre = self._precondition_scalars(plan, precondition)
            if pre is None:
                return reference.precondition_perturb(precondition, plan, reduce_sq, inv_scale)
        sq, norm = self._scalars(plan.locals[0].device)
        extra = reference.grad_sq_sum(plan.slow, sq.device, inv_scale) if plan.slow else None
        self.launch_sq(plan.buckets, extra, sq, norm, inv_scale, pre)
        if reduce_sq is not None:
            reduce_sq(sq)
            torch.sqrt(sq, out=norm)
        for i, bucket in enumerate(plan.buckets):
            self.launch_perturb(bucket, norm, inv_scale, save, None if pre is None else pre[i])
        for group, p, backup in plan.slow:
            reference.perturb_(group, p, backup, norm, inv_scale,
                               None if save is None else save.get(p))
        return norm

    def _precondition_scalars(self, plan: StepPlan, state) -> list | None:
        """Per bucket, (1 / sqrt(1 - beta2^t), eps) for the fused preconditioned passes, or None for a
        bucket whose parameters have no Adam update yet (the identity: SAM's launch). None for the
        whole plan when the kernels cannot take it: no such kernels, parameters outside the
        buckets, a bucket whose state cannot be walked with its parameters or whose parameters are
        at different step counts. The reference ops then make the perturbation. A bucket whose
        columns do not hold the state (a resumed run) takes them from it first, so a resumed run
        makes the steps the uninterrupted one makes."""
        if not self.precondition_kernels or plan.slow:
            return None
        out = []
        for bucket in plan.buckets:
            sts = [state.get(p) for p in bucket.owners]
            started = [bool(st) and "exp_avg_sq" in st for st in sts]
            if not any(started):  # no Adam update yet: SAM's launch
                out.append(None)
                continue
            if not all(started):
                return None
            if bucket.state2 is None or not all(a is local(st["exp_avg_sq"]) for a, st in zip(bucket.state2, sts)) \
                    or bucket.cache.get("state_sig") != _state_signature((bucket.state1, bucket.state2)):
                fresh: list[Tensor] = []  # the columns from the state (a resumed run: before its first update)
                if not self._check_state(bucket, "adam", state, fresh) or fresh:
                    return None
                self._fill_state(bucket, "adam", state)
            steps = [st["step"] for st in sts]
            cached = bucket.cache.get("adam_step")
            if cached is not None and cached[0] == self._updates and cached[2] is steps[0]:
                t = cached[1]
            else:
                values = torch.stack(steps).tolist()
                if any(v != values[0] for v in values):
                    return None
                t = values[0]
            if t == 0:
                return None
            group = bucket.group
            out.append(((1.0 - group["betas"][1] ** t) ** -0.5, float(group["eps"])))
        return out

    def local_dots(self, plan: StepPlan, aux: Buffers, inv_scale: Tensor | None) -> Tensor:
        out = self._dots_out(plan.locals[0].device)
        self.launch_dots(plan.buckets, aux, out, inv_scale)
        if plan.slow:
            out += reference.dots_sum([p for _, p, _ in plan.slow], out.device, aux, inv_scale)
        return out

    # ------------------------------------------------------------------ second step
    def restore(self, plan: StepPlan | None) -> None:
        """Bit-exact restore: one launch per bucket, a copy for each other parameter."""
        if plan is None:
            return
        for bucket in plan.buckets:
            self.launch_update(bucket, UpdateScalars(OPT_RESTORE), None)
        for _, p, backup in plan.slow:
            local(p).detach().copy_(backup)

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

    def restore_and_update(self, perturbed: StepPlan | None, plan: StepPlan, amp: Amp | None = None,
                           combo: Combo | None = None) -> None:
        self._updates += 1
        kind = self._fused_kind()
        if kind == "adam" and amp is not None and float(amp[1]) != 0.0:
            # Adam's step count lives on the host (as torch keeps it), so a skipped step is decided
            # there: one read of found_inf. SGD decides it in the kernel.
            self.restore(perturbed)
            return
        launches = None if kind is None else self._update_launches(kind, perturbed is plan, plan)
        if launches is None:
            check_all_state(self.opt, plan)  # torch.optim would raise half-way, with state half-written
            self.restore(perturbed)
            base_step(self.opt, plan, amp, combo)
            return
        # every check has passed: from here on, only writes
        if perturbed is not plan:
            self.restore(perturbed)  # the update then reads the parameters themselves
        staged = plan.cache.get("staged_now", ())
        for p, dst, pre in staged:
            if pre:
                dst.copy_(p.detach())
        for bucket, update in launches:
            self.launch_update(bucket, update, amp, combo)
        for p, dst, _ in staged:
            p.detach().copy_(dst)

    # ------------------------------------------------------------------ the update's launches
    def _update_launches(self, kind: str, from_backup: bool, plan: StepPlan) -> list[tuple[Bucket, UpdateScalars]] | None:
        """The (bucket, update) launches of a fused update, after checking every state tensor; None
        when some tensor cannot be indexed flat with its parameter (the generic path then runs)."""
        state = self.opt.base_optimizer.state
        buckets = plan.buckets if from_backup else _self_sourced(plan)
        staged = []
        if plan.slow:
            for group, p, backup in plan.slow:
                t = local(p)
                if t.dtype not in self.dtypes or is_dense(t) or not is_dense(backup) or backup.stride() != local(p.grad).stride():
                    return None
                staged.append((t, backup))
            buckets = buckets + self._staged_buckets(plan)
        fresh: list[Tensor] = []  # parameters whose state the update creates, after every check
        for bucket in buckets:
            if not self._check_state(bucket, kind, state, fresh):
                return None
        plan.cache["staged_now"] = [(p, b, not from_backup) for p, b in staged]
        for p in fresh:  # nothing below raises: create the state torch.optim would create
            init_state(kind, state[p], p)
        fresh_ids = {id(p) for p in fresh}
        launches = []
        for bucket in buckets:
            self._fill_state(bucket, kind, state)
            launches += self._sgd(bucket, fresh_ids) if kind == "sgd" else self._adam(bucket)
        return launches

    def _staged_buckets(self, plan: StepPlan) -> list[Bucket]:
        """Non-dense parameters, updated in their dense backup buffers: per (group, dtype)."""
        lists: dict[tuple[int, torch.dtype], tuple[int, dict, list, list]] = {}
        for group, p, backup in plan.slow:
            index = next(i for i, g in enumerate(self.opt.param_groups) if g is group)
            entry = lists.setdefault((index, p.dtype), (index, group, [], []))
            entry[2].append(backup)
            entry[3].append(p)
        return [Bucket(index, group, dsts, dsts, owners) for index, group, dsts, owners in lists.values()]

    def _check_state(self, bucket: Bucket, kind: str, state, fresh: list[Tensor]) -> bool:
        """Every state tensor of the bucket fits its parameter (raises otherwise); False when one
        cannot be indexed flat with it. Lists in ``fresh`` the parameters without state yet."""
        bucket.cache.pop("state_checked", None)
        keys = _state_keys(kind, bucket.group)
        if not keys:
            return True
        owners = bucket.owners
        sts = bucket.cache.get("state_dicts")
        if sts is None or sts[0] is not state:  # the per-parameter state dicts, found once
            sts = bucket.cache["state_dicts"] = (state, [state.get(p) for p in owners])
        sts = sts[1]
        if bucket.state1 is not None and None not in sts:
            cached = (bucket.state1, bucket.state2)
            shards = bucket.owners is not bucket.params and self.plans.params.dtensor  # FSDP2: compare local shards
            if all(_same([local(st.get(k)) if shards else st.get(k) for st in sts], c) for k, c in zip(keys, cached)) \
                    and bucket.cache.get("state_sig") == _state_signature(cached):
                bucket.cache["state_checked"] = True  # _fill_state has nothing to do
                return True
        bucket.cache.pop("state_dicts")  # some may be created below
        for p, dst, st in zip(owners, bucket.params, sts):
            if not st:
                fresh.append(p)
                continue
            check_state(kind, p, st, keys)
            if any(st.get(k) is None for k in keys):  # SGD's buffer not started yet
                fresh.append(p)
                continue
            for key in keys:
                if local(st[key]).stride() != dst.stride():
                    return False
            if kind == "adam":
                step = st["step"]
                if not isinstance(step, Tensor) or step.device.type != "cpu" or step.numel() != 1:
                    return False  # capturable Adam keeps its steps on the device: the generic path
        return True

    def _fill_state(self, bucket: Bucket, kind: str, state) -> None:
        if bucket.cache.pop("state_checked", False):
            return
        keys = _state_keys(kind, bucket.group)
        sts = ()
        if keys:
            cached = bucket.cache.get("state_dicts")
            if cached is None or cached[0] is not state:
                cached = bucket.cache["state_dicts"] = (state, [state[p] for p in bucket.owners])
            sts = cached[1]
        cols = [[local(st[k]) for st in sts] for k in keys] + [None, None]
        sig = _state_signature(cols[:2])
        if _same(cols[0], bucket.state1) and _same(cols[1], bucket.state2) and bucket.cache.get("state_sig") == sig:
            return
        bucket.state1, bucket.state2 = cols[0], cols[1]
        bucket.cache["state_sig"] = sig
        bucket.version += 1  # the pointer tables are rebuilt from the new columns

    def _sgd(self, bucket: Bucket, fresh_ids: set[int]) -> list[tuple[Bucket, UpdateScalars]]:
        group = bucket.group
        update = update_scalars("sgd", group, self.opt.base_optimizer)
        if not fresh_ids or not group["momentum"]:
            return [(bucket, update)]
        owners = bucket.owners
        first = [i for i, p in enumerate(owners) if id(p) in fresh_ids]
        if not first:
            return [(bucket, update)]
        if len(first) == len(owners):
            return [(bucket, replace(update, first=True))]
        rest = [i for i in range(len(owners)) if id(owners[i]) not in fresh_ids]
        return [(bucket.rows(first), replace(update, first=True)), (bucket.rows(rest), update)]

    def _adam(self, bucket: Bucket) -> list[tuple[Bucket, UpdateScalars]]:
        base = self.opt.base_optimizer
        group = bucket.group
        cached = bucket.cache.get("state_dicts")
        sts = cached[1] if cached is not None and cached[0] is base.state else [base.state[p] for p in bucket.owners]
        steps = [st["step"] for st in sts]
        torch._foreach_add_(steps, 1.0)  # host-side CPU scalars, as torch keeps them: no device sync
        cached = bucket.cache.get("adam_step")
        if cached is not None and cached[0] == self._updates - 1 and cached[2] is steps[0]:
            values, uniform = None, cached[1] + 1.0
        else:
            values = torch.stack(steps).tolist()
            uniform = values[0] if all(v == values[0] for v in values) else None
        if uniform is not None:
            bucket.cache["adam_step"] = (self._updates, uniform, steps[0])
            return [(bucket, update_scalars("adam", group, base, uniform))]
        bucket.cache.pop("adam_step", None)
        by_step: dict[float, list[int]] = {}
        for i, v in enumerate(values):
            by_step.setdefault(v, []).append(i)
        return [(bucket.rows(rows), update_scalars("adam", group, base, v)) for v, rows in by_step.items()]


def _self_sourced(plan: StepPlan) -> list[Bucket]:
    """The plan's buckets with the parameters themselves as the update's source (an update with
    no perturbation to undo: LookSAM's steps in between, a second step whose gradients differ
    from the first's), made once per version of the plan's buckets, so that their pointer tables
    and state lists are built once, not per step."""
    key = tuple(b.version for b in plan.buckets)
    cached = plan.cache.get("self_sourced")
    if cached is None or cached[0] != key:
        cached = plan.cache["self_sourced"] = (key, [b.rows(range(len(b.params)), b.params) for b in plan.buckets])
    return cached[1]


def _state_signature(cols) -> tuple:
    """What the kernels depend on in the state columns beyond which tensors they are: addresses,
    element counts and dtypes (``buf.data = x`` changes them under the same object, past every
    identity check)."""
    live = [t for col in cols if col is not None for t in col]
    return list(map(Tensor.data_ptr, live)), list(map(Tensor.numel, live)), list(map(_DTYPE, live))


_DTYPE = operator.attrgetter("dtype")


def _same(a: list | None, b: list | None) -> bool:
    return a is b or (a is not None and b is not None and all(map(operator.is_, a, b)))


