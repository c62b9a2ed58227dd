"""``sam-fused bench``: host cost, optimizer step, training throughput and memory of SAM, side by side.

Every figure of one run is measured in that run, on one device: the per-parameter baseline, the
reference backend, the fused backends, and SGD for scale. The host-cost table times FusedSAM's
first_step + second_step against one fused SGD step on many tiny tensors (host time: on a GPU the
time to enqueue, with the kernels' time beside it).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ... import FusedSAM, UniversalSAM, __version__
from ...backends import available_backends, triton_interpreting
from ..cli import plain
from .baseline import PerParameterSAM
from .host import format_rows as format_host_rows
from .host import host_cost
from .measure import bytes_per_param, copy_bandwidth, count_launches, held_bytes, median, sync, time_ms
from .models import MODELS, build

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9, weight_decay=5e-4), "sgd"),
    "adamw": (torch.optim.AdamW, dict(lr=1e-4, weight_decay=1e-2), "adam"),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure SAM optimizer steps and training throughput against SGD",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--model", action="append", choices=MODELS,
                   help="model to run, repeatable (default: resnet and transformer)")
    p.add_argument("--backend", action="append",
                   help="FusedSAM backend to measure, repeatable (default: every backend that runs "
                        "natively on the device; the torch reference is always measured)")
    p.add_argument("--base", choices=sorted(BASES), default="sgd",
                   help="base optimizer: sgd (momentum 0.9) or adamw (default: sgd)")
    p.add_argument("--steps", type=int, default=None, help="timed repetitions per figure (default: 20 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default: 3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="train at this batch size only (default: a compute-heavy and an optimizer-heavy one per model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype (default: float32)")
    p.add_argument("--transformer-params", type=float, default=None,
                   help="approximate transformer size (default: 1e8 on GPU, 2e6 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-train", action="store_true", help="measure the optimizer step only")
    p.add_argument("--universal", action="store_true",
                   help="also train with Frob-SAM, Trace-SAM and Det-SAM (n = 2; training table only, "
                        "with their cost relative to SGD and to SAM)")
    p.add_argument("--host-tensors", default="100,1000,10000",
                   help="tensor counts of the host-cost table, comma-separated; 'none' skips it "
                        "(default: 100,1000,10000)")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the environment to this file")
    p.set_defaults(func=run)


class Progress:
    """One line on stderr: a bar, a count and what runs now."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def start(self, label: str) -> None:
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        sys.stderr.write(("\r\033[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        self.done += 1
        if self.done == self.total and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sam_fused": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = _cpu_name()
    try:
        root = Path(__file__).resolve().parents[2]
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sam(variant: str, params, base: str):
    cls, kw, _ = BASES[base]
    if variant.startswith("usam-"):
        return UniversalSAM(params, cls, measure=variant[len("usam-"):], n_samples=2, seed=0, **kw)
    if variant == "sam-baseline":
        return PerParameterSAM(params, cls, rho=0.05, **kw)
    return FusedSAM(params, cls, rho=0.05, backend=variant[len("sam-"):], **kw)


def _plain(variant: str, params, base: str):
    cls, kw, _ = BASES[base]
    return cls(params, fused=True, **kw) if variant.endswith("-fused") else cls(params, **kw)


def _plain_fused_ok(device: torch.device, base: str) -> bool:
    p = torch.nn.Parameter(torch.zeros(4, device=device))
    try:
        p.grad = torch.zeros_like(p)
        _plain(f"{base}-fused", [p], base).step()
        return True
    except (RuntimeError, ValueError):
        return False


def variants(device: torch.device, base: str, backends: list[str]) -> list[str]:
    out = [base] + ([f"{base}-fused"] if _plain_fused_ok(device, base) else [])
    return out + ["sam-baseline"] + [f"sam-{b}" for b in backends]


def is_sam(variant: str) -> bool:
    return variant.startswith(("sam-", "usam-"))


def make_optimizer(variant: str, params, base: str):
    return _sam(variant, params, base) if is_sam(variant) else _plain(variant, params, base)


def _sam_or_plain_step(name: str, opt, closure=None):
    """One optimizer step; with ``closure``, a whole training step (zero_grad, forward, backward)."""
    if closure is None:
        if name.startswith("sam-"):
            def step():
                opt.first_step()
                opt.second_step()
        else:
            def step():
                opt.step()
    elif is_sam(name):
        def step():
            opt.zero_grad()
            opt.step(closure)
    else:
        def step():
            opt.zero_grad()
            closure()
            opt.step()
    return step


def optimizer_step_table(workload, variant_names, base, device, dtype, warmup, reps, copy_gbs, progress):
    variant_names = [n for n in variant_names if not n.startswith("usam-")]  # they need a closure
    params = list(workload.model.parameters())
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
    elem = torch.empty((), dtype=dtype).element_size()
    kind = BASES[base][2]
    steps = {}
    for name in variant_names:
        progress.start(f"{workload.name}: optimizer step, {name}: building")
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        steps[name] = _sam_or_plain_step(name, make_optimizer(name, ps, base))
        progress.finish()
    progress.start(f"{workload.name}: optimizer step, {len(steps)} variants in turn")
    times = time_ms(steps, device, warmup, reps)
    launches = {name: count_launches(step, device) for name, step in steps.items()}  # state exists by now
    progress.finish()
    rows = []
    for name in variant_names:
        nbytes = n_params * bytes_per_param(("sam+" if name.startswith("sam-") else "") + kind, elem)
        ms = median(times[name])
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(model=workload.name, variant=name, params=n_params, tensors=len(params),
                         median_ms=ms, times_ms=times[name], launches=launches[name],
                         bytes_per_param=nbytes / n_params, gbs=gbs, roofline=gbs / copy_gbs))
    base_ms = next(r["median_ms"] for r in rows if r["variant"] == "sam-baseline")
    for r in rows:
        r["speedup_vs_baseline"] = base_ms / r["median_ms"]
    return rows


def train_table(workload, variant_names, base, device, warmup, reps, batch_sizes, progress):
    rows = []
    n_params = sum(p.numel() for p in workload.model.parameters())
    for setting, bs in batch_sizes.items():
        batch = workload.make_batch(bs)
        steps, opts = {}, {}
        for name in variant_names:
            progress.start(f"{workload.name}: training, {setting} (batch {bs}), {name}: building")
            model = copy.deepcopy(workload.model)
            opts[name] = make_optimizer(name, list(model.parameters()), base)

            def closure(model=model):
                loss = workload.loss(model, batch)
                loss.backward()
                return loss

            steps[name] = _sam_or_plain_step(name, opts[name], closure)
            progress.finish()
        progress.start(f"{workload.name}: training, {setting} (batch {bs}), {len(steps)} variants in turn")
        times = time_ms(steps, device, warmup, reps)
        peaks = {}
        if device.type == "cuda":
            for name, step in steps.items():
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step()
                sync(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - before
        progress.finish()
        setting_rows = []
        for name in variant_names:
            ms = median(times[name])
            setting_rows.append(dict(model=workload.name, setting=setting, batch_size=bs, variant=name,
                                     median_ms=ms, times_ms=times[name], samples_per_s=bs / (ms * 1e-3),
                                     held_bytes=held_bytes(opts[name]), peak_bytes=peaks.get(name), params=n_params))
        sgd = setting_rows[0]
        sam = [r for r in setting_rows if r["variant"].startswith("sam-") and r["variant"] != "sam-baseline"][-1]
        for r in setting_rows:
            r["ratio_vs_sgd"] = r["samples_per_s"] / sgd["samples_per_s"]
            r["ratio_vs_sam"] = r["samples_per_s"] / sam["samples_per_s"]
            r["extra_bytes_per_param"] = (r["held_bytes"] - sgd["held_bytes"]) / n_params
            if r["peak_bytes"] is not None:
                r["extra_peak_bytes_per_param"] = (r["peak_bytes"] - sgd["peak_bytes"]) / n_params
        rows += setting_rows
        del steps, opts
    return rows


def _fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def report(env, copy_gbs, step_rows, train_rows, host_rows=()) -> str:
    out = [f"sam-fused bench: {env['device_name']} ({env['device']}, {env['threads']} threads), torch "
           f"{env['torch']}, triton {env['triton']}, {env['date']}",
           f"device copy bandwidth (read + write): {copy_gbs:.1f} GB/s", ""]
    if host_rows:
        r0 = host_rows[0]
        gpu = env["device"] == "cuda"
        out.append(f"Host cost: FusedSAM first_step + second_step ({r0['backend']} backend) vs one "
                   f"SGD(fused=True).step(), {r0['numel']}-element tensors, us per tensor, median [quartiles]"
                   + (" (host wall time to enqueue; kernel time beside)" if gpu else ""))
        headers = ["tensors", "grads", "SAM", "fused SGD", "SAM / SGD"] + (["SAM kernels"] if gpu else [])
        out.append(_fmt_table(headers, format_host_rows(list(host_rows), torch.device(env["device"]))))
        out.append("")
    unit = "launches" if env["device"] == "cuda" else "ops"
    for model in dict.fromkeys(r["model"] for r in step_rows):
        rs = [r for r in step_rows if r["model"] == model]
        out.append(f"Optimizer step alone: {model}, {rs[0]['params'] / 1e6:.2f}M params in {rs[0]['tensors']} tensors")
        out.append(_fmt_table(
            ["variant", "median ms", unit, "B/param", "GB/s", "of copy", "vs baseline"],
            [[r["variant"], f"{r['median_ms']:.3f}", r["launches"], f"{r['bytes_per_param']:.0f}",
              f"{r['gbs']:.1f}", f"{100 * r['roofline']:.0f}%", f"{r['speedup_vs_baseline']:.2f}x"] for r in rs]))
        out.append("")
    for key in dict.fromkeys((r["model"], r["setting"], r["batch_size"]) for r in train_rows):
        rs = [r for r in train_rows if (r["model"], r["setting"], r["batch_size"]) == key]
        out.append(f"Training: {key[0]}, {key[1]}, batch {key[2]}  (SAM/SGD ideal: 0.5)")
        universal = any(r["variant"].startswith("usam-") for r in rs)
        headers = ["variant", "median ms", "samples/s", "vs SGD"] + (["vs SAM"] if universal else []) + ["extra B/param"]
        if rs[0]["peak_bytes"] is not None:
            headers.append("extra peak B/param")
        table = []
        for r in rs:
            row = [r["variant"], f"{r['median_ms']:.2f}", f"{r['samples_per_s']:.1f}", f"{r['ratio_vs_sgd']:.3f}"]
            row += [f"{r['ratio_vs_sam']:.3f}"] if universal else []
            row += [f"{r['extra_bytes_per_param']:.1f}"]
            if r["peak_bytes"] is not None:
                row.append(f"{r['extra_peak_bytes_per_param']:.1f}")
            table.append(row)
        out.append(_fmt_table(headers, table))
        out.append("")
    return "\n".join(out)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sam-fused bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    reps = args.steps or (20 if device.type == "cuda" else 10)
    native = [b for b in available_backends(device) if b != "torch"]
    if device.type == "cpu" and triton_interpreting():
        native = [b for b in native if b != "triton"]  # the interpreter is a test tool, not a backend to time
    backends = args.backend or ["torch"] + native
    if "torch" not in backends:
        backends = ["torch"] + backends
    unknown = [b for b in backends if b not in available_backends(device)]
    if unknown:
        print(f"sam-fused bench: backend(s) {unknown} cannot run on {device}; available: "
              f"{available_backends(device)}", file=sys.stderr)
        return 2
    models = args.model or ["resnet", "transformer"]
    tparams = args.transformer_params or (1e8 if device.type == "cuda" else 2e6)
    names = variants(device, args.base, backends)
    universal = ["usam-frob", "usam-trace", "usam-det"] if args.universal else []
    workloads = [build(m, device, tparams, dtype) for m in models]
    n_settings = 1 if args.batch_size else 2
    per_setting = len(names) + 1  # building each variant, then timing them in turn
    train_tasks = 0 if args.no_train else n_settings * (per_setting + len(universal))
    host_counts = [] if args.host_tensors == "none" else [int(n) for n in args.host_tensors.split(",")]
    host_backend = next((b for b in backends if b != "torch"), "torch")
    progress = Progress(1 + bool(host_counts) + len(workloads) * (per_setting + train_tasks))

    progress.start("device copy bandwidth")
    copy_gbs = copy_bandwidth(device)
    progress.finish()
    env = environment(device)
    host_rows = []
    if host_counts:
        progress.start(f"host cost of a step on {', '.join(map(str, host_counts))} tiny tensors ({host_backend})")
        host_rows = host_cost(device, host_backend, host_counts, reps=reps)
        progress.finish()
    step_rows, train_rows = [], []
    for w in workloads:
        step_rows += optimizer_step_table(w, names, args.base, device, dtype, args.warmup, reps, copy_gbs, progress)
        if not args.no_train:
            sizes = {"custom": args.batch_size} if args.batch_size else w.batch_sizes
            train_rows += train_table(w, names + universal, args.base, device, args.warmup, reps, sizes, progress)
    print(report(env, copy_gbs, step_rows, train_rows, host_rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(environment=env, copy_gbs=copy_gbs, base=args.base, dtype=args.dtype,
                       host_cost=host_rows, optimizer_step=step_rows, training=train_rows)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0
