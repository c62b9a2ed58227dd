"""Host cost of a SAM step: the Python and C++ the host runs per step, next to one fused SGD step.

On many tiny tensors (16 elements each) the kernels cost next to nothing, so on the CPU the time
of a step is its host time. On a GPU the figure is the wall time to enqueue the step (no
synchronization inside the timed region), reported next to the kernels' own time (CUDA events).

Both optimizers see the same tensors; the two are timed in turn, round after round. Three regimes:
``in place`` (gradients written into the same ``.grad`` tensors, as after
``zero_grad(set_to_none=False)``), ``new`` (new ``.grad`` tensors before each pass, from a pool
of other addresses) and ``backward`` (the loop most users run: ``zero_grad()``, which sets the
gradients to None, then a real backward, which hands out new ``.grad`` tensors wherever the
allocator puts them; ``same_addresses`` is the fraction of SAM passes whose gradients came back at
the addresses of the same pass one step before, where the Triton tables need no upload). Making
the gradients (and the backward) is not timed, for either optimizer.
"""

from __future__ import annotations

import statistics
import time

import torch

from ...optim import FusedSAM
from .measure import sync


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(host wall ms, device ms) of one call; device ms is the host figure on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end)


def host_cost(device: torch.device, backend: str, counts=(100, 1000, 10000), reps: int = 20, warmup: int = 3,
              numel: int = 16) -> list[dict]:
    """Per (tensor count, grad regime): medians and quartiles of the host time of SAM's
    first_step + second_step and of ``SGD(fused=True).step()``, in microseconds per tensor."""
    rows = []
    for n in counts:
        gen = torch.Generator().manual_seed(n)
        data = [torch.randn(numel, generator=gen).to(device) for _ in range(n)]
        grad_sets = [[torch.randn(numel, generator=gen).to(device) for _ in range(n)] for _ in range(4)]
        for regime in ("in place", "new", "backward"):
            sam_params = [torch.nn.Parameter(d.clone()) for d in data]
            sgd_params = [torch.nn.Parameter(d.clone()) for d in data]
            sam = FusedSAM(sam_params, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, backend=backend)
            sgd = torch.optim.SGD(sgd_params, lr=1e-3, momentum=0.9, fused=True)

            def set_grads(params, k):
                if regime == "backward":  # zero_grad() then a real backward: new grads where autograd puts them
                    for p in params:
                        p.grad = None
                    with torch.enable_grad():
                        sum((p * g).sum() for p, g in zip(params, grad_sets[k])).backward()
                    return
                for p, g in zip(params, grad_sets[k]):
                    if regime == "new" or p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)

            times: dict[str, list[tuple[float, float]]] = {"sam": [], "sgd": []}
            last, same, passes = {}, 0, 0
            for r in range(warmup + reps):
                pair = []
                for k, fn in ((0, sam.first_step), (1, sam.second_step)):
                    set_grads(sam_params, k)
                    addrs = tuple(p.grad.data_ptr() for p in sam_params)
                    if r >= warmup:
                        same, passes = same + (last.get(k) == addrs), passes + 1
                    last[k] = addrs
                    pair.append(_timed(fn, device))
                a, b = pair
                set_grads(sgd_params, 2)
                c = _timed(sgd.step, device)
                if r >= warmup:
                    times["sam"].append((a[0] + b[0], a[1] + b[1]))
                    times["sgd"].append(c)
            row = dict(tensors=n, grads=regime, backend=backend, numel=numel, same_addresses=same / max(passes, 1))
            for name, ts in times.items():
                host = sorted(1e3 * t[0] / n for t in ts)
                q = statistics.quantiles(host, n=4)
                row[f"{name}_us_per_tensor"] = statistics.median(host)
                row[f"{name}_q1"], row[f"{name}_q3"] = q[0], q[2]
                if device.type == "cuda":
                    row[f"{name}_kernel_us_per_tensor"] = statistics.median(1e3 * t[1] / n for t in ts)
            row["ratio"] = row["sam_us_per_tensor"] / row["sgd_us_per_tensor"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict], device: torch.device) -> list[list[str]]:
    out = []
    for r in rows:
        line = [str(r["tensors"]), r["grads"],
                f"{r['sam_us_per_tensor']:.2f} [{r['sam_q1']:.2f}, {r['sam_q3']:.2f}]",
                f"{r['sgd_us_per_tensor']:.2f} [{r['sgd_q1']:.2f}, {r['sgd_q3']:.2f}]", f"{r['ratio']:.2f}x",
                f"{100 * r['same_addresses']:.0f}%"]
        if device.type == "cuda":
            line.append(f"{r['sam_kernel_us_per_tensor']:.2f}")
        out.append(line)
    return out
