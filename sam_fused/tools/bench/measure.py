"""Timers, copy bandwidth, op/launch counting, held memory, and the bytes each step must move.

Bytes per parameter (element size s; fp32: s = 4), the fewest a step can move:

    SAM norm            R g                    s      (ASAM also R w: 2 s)
    SAM perturb         R w, g; W backup, w    4 s
    SGD (momentum)      R w, g, m; W w, m      5 s    (plain SGD: R w, g; W w: 3 s)
    Adam / AdamW        R w, g, m, v; W w, m, v 7 s
    restore             fused into the update  0

so SAM + SGD-momentum = 10 s = 40 B/param, SGD-momentum alone = 20 B/param. Achieved GB/s is
always these minimal bytes over the measured time, so its fraction of the copy bandwidth is the
fraction of the memory roofline a step reaches, whatever it really moved.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int) -> dict[str, list[float]]:
    """Per-call times in ms of several functions, taken in turn (one call of each per round), so
    that drift of clocks, caches or other load touches all of them alike. CUDA events on a GPU,
    ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: list[float]) -> tuple[float, float]:
    """(first, third) quartile; both the value itself for fewer than two values."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def rel_spread(xs: list[float]) -> float:
    """Interquartile range over the median: the spread a figure is printed with."""
    q1, q3 = quartiles(xs)
    return (q3 - q1) / statistics.median(xs)


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """Round by round ratios b_i / a_i of two series timed in turn (``time_ms``): drift and load
    touch both members of a pair alike, so their spread is the ratio's own."""
    return [y / x for x, y in zip(a, b)]


def copy_bandwidth(device: torch.device, reps: int = 10) -> float:
    """GB/s of a large ``dst.copy_(src)``, counting bytes read plus bytes written."""
    n = (256 << 20) if device.type == "cuda" else (16 << 20)  # fp32 elements: 1 GiB / 64 MiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median(time_ms({"copy": lambda: dst.copy_(src)}, device, warmup=2, reps=reps)["copy"])
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


NATIVE_KERNELS = ("sq_sum_", "perturb_", "restore_update_")


def _count_native_calls(module, counter: "_OpCounter"):
    """Wrap the native extension's kernels so that each call counts as one op (they are not ATen
    ops, so the dispatch mode does not see them); returns the undo."""
    originals = {name: getattr(module, name) for name in NATIVE_KERNELS}

    def wrap(fn):
        def counted(*args, **kwargs):
            counter.count += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(module, name, wrap(fn))
    return lambda: [setattr(module, name, fn) for name, fn in originals.items()]


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """GPU kernels launched by one call (profiler), or on the CPU the ATen ops dispatched plus the
    native kernels called."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from ... import native

    counter = _OpCounter()
    undo = _count_native_calls(native._MODULE, counter) if native._MODULE is not None else None
    try:
        with counter:
            fn()
    finally:
        if undo is not None:
            undo()
    return counter.count


def held_bytes(opt) -> int:
    """Bytes of every tensor an optimizer holds between steps (state, and SAM's backups)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for holder in (opt, getattr(opt, "base_optimizer", None)):
        if holder is None:
            continue
        for st in holder.state.values():
            for v in st.values():
                add(v)
    backend = getattr(opt, "_backend", None)
    for b in getattr(backend, "backups", {}).values():
        add(b)
    for bufs in getattr(backend, "buffers", {}).values():  # universal SAM: g0 and the sums
        for b in bufs.values():
            add(b)
    for name in ("_save", "_gv"):  # GSAM's saved gradient; LookSAM's g_v and saved gradient
        bufs = getattr(opt, name, None)
        if bufs is not None:
            for b in bufs.values():
                add(b)
    return total


def bytes_per_param(kind: str, elem: int, adaptive: bool = False) -> int:
    """Minimal bytes per parameter of one step of ``kind`` (see the module docstring)."""
    update = {"sgd": 5, "sgd-plain": 3, "adam": 7}
    if kind.startswith("sam+"):
        base = kind[4:]
        return elem * ((2 if adaptive else 1) + 4 + update[base])
    return elem * update[kind]
