"""The cached plan of a SAM step: which parameters are fused, in which bucket, with which buffers.

Building a plan walks every parameter once: it validates each gradient (dense, same shape, dtype
and device as its parameter; no sparse gradients; no parameter listed twice or with overlapping
memory), sorts the parameters into buckets of one (param group, dtype) whose tensors can all be
walked as one flat array, and gives each parameter its exact backup. A step then only checks that
the plan still holds:

* the grads are the same tensor objects as last time (one identity check per tensor); when
  autograd handed out new ``.grad`` tensors (``zero_grad(set_to_none=True)``), only the grad
  column is validated and refreshed;
* every fused parameter still has its storage address and size (``p.data = ...`` elsewhere
  rebuilds the plan);
* the param groups hold the same parameters (one identity check per tensor).

Plans are cached per pattern of missing grads (at most ``MAX_PLANS``, least recently used first
out); backups and every other parameter-sized buffer live in weak dictionaries, so they die with
their parameter. Invalidated by ``add_param_group``, ``load_state_dict`` and ``invalidate()``.
Nothing here reads a value back from the device.
"""

from __future__ import annotations

import operator
from collections import OrderedDict

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .distributed import local, sharded_reduce
from .layout import is_dense



FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_PLANS = 8




class Buffers:
    """One parameter-sized buffer per parameter, allocated on first use, alive as long as the
    parameter. A dense parameter's buffer has its strides, so both can be walked flat together;
    any other parameter's is dense (``empty_like`` with ``preserve_format``)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype  # None: the parameter's dtype
        self._bufs = WeakIdKeyDictionary()

    def get(self, p: Tensor) -> Tensor:
        """The buffer of ``p`` (of its local shard for a DTensor), keyed by ``p`` itself."""
        b = self._bufs.get(p)
        t = local(p)
        dtype = self.dtype or t.dtype
        if b is None or b.shape != t.shape or b.dtype != dtype or b.device != t.device or (
            is_dense(t) and b.stride() != t.stride()
        ):
            b = torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format).detach()
            self._bufs[p] = b
        return b

    def __len__(self) -> int:
        return len(self._bufs)

    def values(self):
        return list(self._bufs.values())


class ZeroBuffers(Buffers):
    """Buffers that start at zero (a buffer the kernels may read before they first write it: a
    saved gradient that a non-finite step did not write, a g_v before the first SAM step)."""

    def get(self, p: Tensor) -> Tensor:
        fresh = self._bufs.get(p)
        b = super().get(p)
        if b is not fresh:
            b.zero_()
        return b


class Bucket:
    """The flat-indexable parameters of one param group and one dtype, launched together.

    ``params`` (the tensors written: the parameters, or for a staged update their buffers),
    ``backups`` (the update's source), ``state1``, ``state2`` are parallel lists (the state lists
    are None until the update fills them); ``owners`` are the parameters themselves, whose
    ``.grad`` the kernels read and which key the optimizer state. No gradient is held here (that
    would keep a replaced gradient's memory alive): ``grads()`` reads them when a launch needs
    them. ``version`` counts changes of any column (a new grad tensor included), so a backend can
    tell when what it built from them (a pointer table) is stale. ``cache`` is the backend's own.
    """

    __slots__ = ("index", "group", "dtype", "device", "params", "owners", "backups", "state1", "state2",
                 "version", "cache", "positions", "_grads")

    def __init__(self, index: int, group: dict, params: list[Tensor], backups: list[Tensor],
                 owners: list[Tensor] | None = None, state1: list[Tensor] | None = None,
                 state2: list[Tensor] | None = None):
        self.index, self.group = index, group
        self.dtype, self.device = params[0].dtype, params[0].device
        self.params, self.backups = params, backups
        self.owners = params if owners is None else owners
        self.state1, self.state2 = state1, state2
        self.version = 0
        self.cache: dict = {}
        self.positions: operator.itemgetter | None = None  # picks this bucket's grads from a step's list
        self._grads: tuple | None = None  # this pass's gradients (held only during the pass)

    def grads(self) -> list[Tensor] | tuple:
        """The gradients (this pass's, while the plan holds them)."""
        if self._grads is not None:
            return self._grads
        return [local(p.grad) for p in self.owners]

    def buffers(self, bufs: "Buffers") -> list[Tensor]:
        """The buffers of ``bufs`` for this bucket's parameters, found once per version."""
        key = ("buffers", id(bufs))
        cached = self.cache.get(key)
        if cached is None or cached[0] != self.version or cached[1] is not bufs:
            cached = self.cache[key] = (self.version, bufs, [bufs.get(p) for p in self.owners])
        return cached[2]

    def rows(self, rows, sources: list[Tensor] | None = None) -> "Bucket":
        """A bucket of some of these rows (a launch over part of the bucket), optionally with other sources."""
        pick = lambda xs: None if xs is None else [xs[r] for r in rows]  # noqa: E731
        return Bucket(self.index, self.group, pick(self.params), pick(self.backups) if sources is None else pick(sources),
                      pick(self.owners), pick(self.state1), pick(self.state2))


class StepPlan:
    """What a step does with one pattern of present/missing grads (see the module docstring).

    ``buckets``: flat-indexable tensors per (group, dtype). ``slow``: (group, param, backup) of
    the parameters the kernels cannot index flat (not dense, a grad with other strides, a dtype the
    backend has no kernel for); the reference ops perturb them. ``active``: every parameter with a
    grad, group order; ``locals``: the tensors the kernels write for them (the same tensors, or a
    DTensor's local shard under FSDP2).
    """

    def __init__(self, owner: "PlanCache", grads: list[Tensor | None]) -> None:
        self.active: list[Tensor] = []
        self.locals: list[Tensor] = []
        self.buckets: list[Bucket] = []
        self.slow: list[tuple[dict, Tensor, Tensor]] = []
        self.cache: dict = {}  # the backend's, e.g. the update's partition of the buckets
        self._build(owner.params, owner.dtypes, owner.backups if owner.keep_backups else None, grads)
        self._sign = _grad_signature(grads)  # no reference: a replaced gradient's memory is freed as usual

    def _build(self, ps: "ParamSet", dtypes, backups: Buffers | None, grads: list[Tensor | None]) -> None:
        k = 0
        for gi, group in enumerate(ps.groups):
            lists: dict[torch.dtype, tuple[list, list, list]] = {}
            for p in group["params"]:
                g = grads[k]  # already local (PlanCache.plan)
                if g is not None:
                    t = local(p)
                    check_grad(t, g)
                    check_param(t)  # it may have been replaced since the ParamSet was made
                    self.active.append(p)
                    self.locals.append(t)
                    b = t if backups is None else backups.get(p)  # no backups: the parameter is its own source
                    if t.dtype in dtypes and is_dense(t) and g.stride() == t.stride():
                        cols = lists.setdefault(t.dtype, ([], [], [], []))
                        cols[0].append(t)
                        cols[1].append(b)
                        cols[2].append(k)
                        cols[3].append(p)
                    else:
                        self.slow.append((group, p, b))
                k += 1
            for ts, bs, pos, owners in lists.values():
                bucket = Bucket(gi, group, ts, bs, owners if ps.dtensor else None)
                bucket.positions = operator.itemgetter(*pos) if len(pos) > 1 else (lambda xs, i=pos[0]: (xs[i],))
                self.buckets.append(bucket)
        self.ptrs = list(map(Tensor.data_ptr, self.locals))
        self.numels = list(map(Tensor.numel, self.locals))

    def hold_grads(self, grads: list[Tensor | None] | None) -> None:
        """Hand each bucket this pass's gradients (one C-level pick per bucket), or, with None, let
        go of them at the end of the pass (a replaced gradient's memory is then freed as usual)."""
        for b in self.buckets:
            b._grads = None if grads is None else b.positions(grads)

    def still_valid(self) -> bool:
        """Every parameter keeps its storage address and size (cheap: two calls per tensor)."""
        act = self.locals
        return list(map(Tensor.data_ptr, act)) == self.ptrs and list(map(Tensor.numel, act)) == self.numels

    def same_grads(self, ids: list[int], grads: list[Tensor | None]) -> bool:
        """The kernels would see the same gradients: same objects (``ids``), addresses, strides,
        sizes and dtypes (``p.grad.data = x`` swaps all of these under the same object, past the
        ``.grad`` setter's checks)."""
        if ids != self._sign[0]:
            return False
        try:
            return _grad_signature(grads, ids)[1:] == self._sign[1:]
        except RuntimeError:  # a sparse gradient: no address or strides
            return False

    def refresh(self, grads: list[Tensor | None], ids: list[int]) -> bool:
        """Take new grad tensors with the same present/missing pattern; False when a new grad is not
        laid out like its parameter (the plan is then rebuilt, and a bad grad refused there).

        A new gradient must have the strides, sizes and dtypes the plan was built and checked with
        (the ``.grad`` setter checks shape and dtype, but ``p.grad.data = x`` does not); only its
        address may differ. ``still_valid`` covers the parameters."""
        try:
            new = _grad_signature(grads, ids)
        except RuntimeError:  # a sparse gradient has no address or strides
            return False
        if new[2:] != self._sign[2:]:
            return False
        self._sign = new
        for bucket in self.buckets:  # their tables hold the old addresses
            bucket.version += 1
        return True


def overlapping(t: Tensor) -> bool:
    """Some element of ``t`` shares its memory with another (an ``expand``-ed tensor)."""
    return not is_dense(t) and (
        torch._debug_has_internal_overlap(t) == 1 or any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
    )


_NONE_ID = id(None)


def check_param(p: Tensor) -> None:
    if overlapping(p):
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} with strides {p.stride()} has overlapping memory "
            "(an expanded tensor): a step would write one element several times"
        )


_DTYPE = operator.attrgetter("dtype")


def _grad_signature(grads: list[Tensor | None], ids: list[int] | None = None) -> tuple:
    """What the kernels depend on: which tensors (ids; None for a missing grad), their addresses,
    strides, element counts and dtypes. A new tensor at a reused id that agrees in all of them is,
    to the kernels, the same gradient (its device cannot change under an unchanged address)."""
    live = [g for g in grads if g is not None]
    return (ids or list(map(id, grads)), list(map(Tensor.data_ptr, live)), list(map(Tensor.stride, live)),
            list(map(Tensor.numel, live)), list(map(_DTYPE, live)))


def check_grad(p: Tensor, g: Tensor) -> None:
    """A gradient the fused passes can use, or a clear error (raised before anything is written)."""
    if g.is_sparse:
        raise RuntimeError("FusedSAM does not support sparse gradients")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"FusedSAM supports float32, bfloat16, float16 and float64 parameters, got {p.dtype}")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(
            f"a gradient does not match its parameter: grad {tuple(g.shape)} {g.dtype} on {g.device}, "
            f"parameter {tuple(p.shape)} {p.dtype} on {p.device} (was the parameter replaced after backward?)"
        )
    if g.layout != torch.strided or overlapping(g):
        raise RuntimeError("a gradient with overlapping memory (an expanded tensor) cannot be used")


class ParamSet:
    """The parameters of every param group, flattened, validated once (unique, no overlapping memory)."""

    def __init__(self, groups: list[dict]) -> None:
        self.groups = groups
        self.lists = [g["params"] for g in groups]
        self.params = [p for ps in self.lists for p in ps]
        seen = set()
        for p in self.params:
            if id(p) in seen:
                raise ValueError(
                    "a parameter appears twice in the param groups; SAM's exact restore needs each "
                    "parameter once (torch.optim only warns about this)"
                )
            seen.add(id(p))
            check_param(local(p))
        # FSDP2: DTensor parameters (the kernels see their local shards), and the all-reduce that
        # makes a sum of local squares global (None: nothing to reduce)
        self.dtensor, self.reduce_sq = sharded_reduce(self.params)

    def same(self, groups: list[dict], params: list[Tensor]) -> bool:
        """``groups`` still hold these lists of these parameters (``params``: theirs, flattened)."""
        return (
            len(groups) == len(self.lists)
            and all(group["params"] is ps for group, ps in zip(groups, self.lists))
            and len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
        )


class PlanCache:
    """The plans of one optimizer, keyed by which parameters have a grad."""

    def __init__(self, dtypes: tuple[torch.dtype, ...], keep_backups: bool = True) -> None:
        self.dtypes = dtypes
        self.keep_backups = keep_backups  # False: an algorithm that undoes its perturbation by arithmetic (MSAM)
        self.backups = Buffers()
        self.params: ParamSet | None = None
        self._plans: OrderedDict[tuple, StepPlan] = OrderedDict()
        self._last: StepPlan | None = None

    def bind(self, groups: list[dict]) -> None:
        """Take these param groups now (refusing a parameter listed twice before any step)."""
        self.invalidate()
        self.params = ParamSet(groups)

    def invalidate(self) -> None:
        """Param groups or parameters changed: forget every plan (backups stay with their params)."""
        self.params = None
        self._plans.clear()
        self._last = None

    def plan(self, groups: list[dict], skip: frozenset | None = None) -> StepPlan:
        """The plan for the grads as they are now; raises before anything is written if one is bad.
        ``skip``: indices of groups taken as having no gradient (left out of a perturbation)."""
        ps = self.params
        params = [p for group in groups for p in group["params"]]
        if ps is None or not ps.same(groups, params):
            self.invalidate()
            ps = self.params = ParamSet(groups)
        if skip:
            grads = [None if i in skip else p.grad for i, group in enumerate(groups) for p in group["params"]]
        else:
            grads = [p.grad for p in params]
        if ps.dtensor:  # the kernels see the local shards
            grads = [None if g is None else local(g) for g in grads]
        ids = list(map(id, grads))
        plan = self._last
        if plan is not None and plan.same_grads(ids, grads) and plan.still_valid():
            plan.hold_grads(grads)
            return plan
        key = bytes(map(_NONE_ID.__eq__, ids))  # which parameters have no grad
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            if not (plan.still_valid() and plan.refresh(grads, ids)):
                plan = None
        if plan is None:
            plan = StepPlan(self, grads)
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        self._last = plan
        plan.hold_grads(grads)
        return plan

    def end_pass(self) -> None:
        """Let go of the gradients the buckets held during a pass."""
        if self._last is not None:
            self._last.hold_grads(None)
