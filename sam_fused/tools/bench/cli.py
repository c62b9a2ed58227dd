"""``sam-fused bench``: host cost, optimizer step, training throughput and memory of SAM, side by side.

Every figure of one run is measured in that run, on one device: the per-parameter baseline, the
reference backend, the fused backends, and SGD for scale, timed in turn (one call of each per
round) and printed as a median with its spread (the interquartile range; ratios from the
round-by-round pairs). The host-cost table times FusedSAM's first_step + second_step against one
fused SGD step on many tiny tensors (host time: on a GPU the time to enqueue, with the kernels'
time beside it).

On the CPU the default run answers the main question in about a minute on two cores: host cost
at 100 and 1000 tensors, the optimizer step of the transformer against the per-parameter
baseline and SGD (bandwidth as a fraction of a copy), and one SAM/SGD training-throughput ratio.
``--full`` adds the ResNet, the optimizer-heavy batch size and 10000 tensors (the default on a
GPU). The bench warns when the machine is busy (load above its cores) or a figure's spread is
wide; on a busy CPU it times with one thread unless ``--threads`` says otherwise, since OpenMP's
threads then wait on each other far more than they compute; a busy run's tables are marked.
The run ends with a bottom line in words: FusedSAM's step against the per-parameter loop, and the
training throughput relative to SGD of both.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ... import GSAM, MSAM, FunctionalSAM, FusedSAM, LookSAM, UniversalSAM, __version__
from ...nn import norm_layer_param_groups
from ...backends import available_backends, triton_interpreting
from .. import args as checks
from ..common import busy_note, cpu_count, cpu_name, load, plain
from .baseline import PerParameterSAM
from .host import format_rows as format_host_rows
from .host import host_cost
from .measure import (bytes_per_param, copy_bandwidth, count_launches, held_bytes, median, paired_ratios, quartiles,
                      rel_spread, sync, time_ms)
from .models import MODELS, build
from . import roofline

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
    p.add_argument("--device", type=checks.device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--model", action="append", choices=MODELS,
                   help="model to run, repeatable (default: transformer; with --full or on a GPU, resnet and "
                        "transformer)")
    p.add_argument("--full", action="store_true",
                   help="every section: both models, both batch sizes, 10000 tensors in the host table "
                        "(the default on a GPU)")
    p.add_argument("--backend", action="append",
                   help="FusedSAM backend to measure, repeatable (default: every backend that runs "
                        "natively on the device; the torch reference is always measured)")
    p.add_argument("--base", choices=sorted(BASES), default="sgd",
                   help="base optimizer: sgd (momentum 0.9) or adamw (default: sgd)")
    p.add_argument("--steps", type=checks.int_at_least(2), default=None,
                   help="timed repetitions per figure, at least 2 (default: 20 on GPU, 30 on CPU)")
    p.add_argument("--warmup", type=checks.non_negative_int, default=3, help="untimed repetitions first (default: 3)")
    p.add_argument("--batch-size", type=checks.positive_int, default=None,
                   help="train at this batch size only (default: the model's compute-heavy batch size; with "
                        "--full, also an optimizer-heavy one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype (default: float32)")
    p.add_argument("--transformer-params", type=checks.finite_positive_float, default=None,
                   help="approximate transformer size in parameters (default: 1e8 on GPU, 2e6 on CPU)")
    p.add_argument("--threads", type=checks.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 when the machine is busy)")
    p.add_argument("--no-train", action="store_true", help="measure the optimizer step only")
    p.add_argument("--universal", action="store_true",
                   help="also train with Frob-SAM, Trace-SAM and Det-SAM (n = 2; training table only, "
                        "with their cost relative to SGD and to SAM)")
    p.add_argument("--efficient", action="store_true",
                   help="also train with interval SAM (SAM every 5th step), randomized SAM (RST, p = 0.5), GSAM "
                        "(alpha 0.4), LookSAM (k = 5, alpha 0.7), Momentum-SAM (rho 3), a 25%% SAM phase, "
                        "Functional-SAM, SAM-ON (the normalization layers perturbed, the rest not) and, with "
                        "--base adamw, the preconditioned perturbation: "
                        "training table only, their throughput relative to SGD and to SAM, per step averaged "
                        "over whole cycles")
    p.add_argument("--host-tensors", default=None,
                   type=checks.count_list("comma-separated positive tensor counts, or 'none'", none=True),
                   help="tensor counts of the host-cost table, comma-separated; 'none' skips it "
                        "(default: 100,1000; with --full or on a GPU, 100,1000,10000)")
    p.add_argument("--roofline", action="store_true",
                   help="also time each pass of the fused step alone (norm, perturb, restore+update for SGD-momentum "
                        "and AdamW, the GSAM/LookSAM dots pass, the whole step) with torch's fused SGD and AdamW "
                        "beside, as GB/s and a fraction of the copy bandwidth (the default on a GPU)")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline section on a GPU")
    p.add_argument("--roofline-sizes", default=None,
                   type=checks.count_list("comma-separated positive parameter counts"),
                   help="single-tensor sizes of the roofline, comma-separated parameter counts (default: "
                        "16e6,64e6,256e6,1e9 on a GPU, 1e6,4e6 on the CPU)")
    p.add_argument("--roofline-mixes", type=checks.choice_list(roofline.MIXES, none=True),
                   default=list(roofline.MIXES),
                   help="tensor mixes of the roofline, comma-separated from transformer, resnet50 (161 tensors, "
                        "25.6M), llm (194 tensors, 0.98B); scaled down to the largest size on the CPU; 'none' "
                        "(default: all three)")
    p.add_argument("--roofline-dtypes", type=checks.choice_list(sorted(DTYPES)), default=["float32", "bfloat16"],
                   help="parameter dtypes of the roofline, comma-separated (default: float32,bfloat16)")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the environment to this file")
    p.set_defaults(func=run, check=check)


def check(args, parser) -> None:
    """What argparse's types cannot see alone: the --json path, the backends against the device, the
    roofline's need of a fused backend. Creates nothing; a problem is argparse's error (exit 2). The
    path comes first: knowing the backends may mean loading (on a first run, building) the native
    extension."""
    if args.json is not None:
        problem = checks.output_file_problem(args.json)
        if problem:
            parser.error(f"argument --json: {problem}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    roof = args.roofline or (device.type == "cuda" and not args.no_roofline)
    if not (args.backend or roof):
        return
    available = available_backends(device)
    unknown = [b for b in args.backend or () if b not in available]
    if unknown:
        parser.error(f"argument --backend: {', '.join(unknown)} cannot run on {device}; available here: "
                     f"{', '.join(available)}")
    if roof and not [b for b in args.backend or available if b != "torch"]:
        parser.error("argument --roofline: it times the fused backends' passes, and none is measured "
                     f"(--backend {', '.join(args.backend or ['torch'])}; available here: {', '.join(available)})")


class Progress:
    """One line on stderr: a bar, the time left and what runs now. Each task has a weight (its
    expected share of the run); the time left is the elapsed time scaled by the weight left."""

    def __init__(self, total: float) -> None:
        self.total, self.done, self.tty = total, 0.0, sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._weight = 1.0

    def start(self, label: str, weight: float = 1.0) -> None:
        self._weight = weight
        width = 24
        filled = int(width * self.done / max(self.total, 1e-9))
        elapsed = time.perf_counter() - self.t0
        left = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left" if self.done > 0 else ""
        line = f"[{'#' * filled}{'.' * (width - filled)}] {elapsed:.0f} s{left}: {label}"
        sys.stderr.write(("\r\033[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        self.done += self._weight
        if self.done >= self.total - 1e-9 and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# A figure whose interquartile range exceeds this fraction of its median is flagged.
SPREAD_WARN = 0.15


def warnings_for(env: dict, step_rows, train_rows, host_rows) -> list[str]:
    """What makes this run's figures doubtful: load above the cores, wide spreads."""
    out = []
    cores = env["cores"]
    for when in ("load_start", "load_end"):
        value = env.get(when)
        if value is not None and env["device"] == "cpu" and value > cores:
            out.append(f"the machine was busy: load average {value:.1f} on {cores} cores at the "
                       f"{when.split('_')[1]} of the run; the timings are unreliable")
    wide = [f"{r['model']} step {r['variant']}" for r in step_rows if r["spread"] > SPREAD_WARN]
    wide += [f"{r['model']} training {r['variant']} (batch {r['batch_size']})" for r in train_rows
             if r["spread"] > SPREAD_WARN]
    wide += [f"host cost at {r['tensors']} tensors ({r['grads']} grads)" for r in host_rows
             if r["sam_q3"] - r["sam_q1"] > SPREAD_WARN * r["sam_us_per_tensor"]]
    if wide:
        out.append(f"spread (interquartile range) above {SPREAD_WARN:.0%} of the median for: " + "; ".join(wide)
                   + ". Rerun on a quiet machine or with more --steps")
    return out


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sam_fused": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cores": cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = cpu_name()
    try:
        root = Path(__file__).resolve().parents[2]
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    # a copy of a working tree without its history (a remote GPU machine) is told its commit
    env["commit"] = os.environ.get("SAM_FUSED_COMMIT") or env["commit"]
    return env


# The efficient SAM family: (class, its keywords, step(closure) calls timed as one round: a whole
# cycle of an interval; for RST enough calls that each round holds about the expected share of
# SAM steps)
# rows named as `sam-fused compare` names the optimizers
EFFICIENT = {
    "interval": (FusedSAM, dict(interval=5), 5),
    "rst": (FusedSAM, dict(sam_probability=0.5), 10),
    "gsam": (GSAM, dict(alpha=0.4), 1),
    "looksam": (LookSAM, dict(k=5, alpha=0.7), 5),
    "msam": (MSAM, dict(rho=3.0), 1),  # the authors' rho; one forward/backward per step
    "phase": (FusedSAM, dict(phase=lambda step: step % 4 == 3), 4),  # a 25% SAM phase: its cost per step
    "psam": (FusedSAM, dict(precondition=True), 1),  # the preconditioned perturbation: Adam/AdamW bases only
    "fsam": (FunctionalSAM, {}, 1),  # Functional-SAM: its closure returns (loss, outputs), no backward
    "samon": (FusedSAM, {}, 1),  # SAM-ON: the norm layers perturbed, the rest perturb=False
}
ADAM_ONLY = {"psam"}
FUNCTIONAL = {"fsam"}  # the closure runs the forward only and returns (loss, outputs)
SUBSET = {"samon"}  # the optimizer takes norm_layer_param_groups(model)


def calls_per_round(variant: str) -> int:
    return EFFICIENT[variant][2] if variant in EFFICIENT else 1


def _sam(variant: str, params, base: str):
    cls, kw, _ = BASES[base]
    if variant in EFFICIENT:
        sam_cls, sam_kw, _ = EFFICIENT[variant]
        return sam_cls(params, cls, **dict(dict(rho=0.05), **sam_kw), **kw)
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
    return variant.startswith(("sam-", "usam-")) or variant in EFFICIENT


def needs_closure(variant: str) -> bool:
    """The universal and efficient rows: timed in training only (their step takes a closure)."""
    return variant.startswith("usam-") or variant in EFFICIENT


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
        calls = calls_per_round(name)

        def step():
            for _ in range(calls):
                opt.zero_grad()
                opt.step(closure)
    else:
        def step():
            opt.zero_grad()
            closure()
            opt.step()
    return step


def optimizer_step_table(workload, variant_names, base, device, dtype, warmup, reps, copy_gbs, progress):
    variant_names = [n for n in variant_names if not needs_closure(n)]
    params = list(workload.model.parameters())
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
    elem = torch.empty((), dtype=dtype).element_size()
    kind = BASES[base][2]
    steps = {}
    for name in variant_names:
        progress.start(f"{workload.name}: optimizer step, {name}: building", 0.1)
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        steps[name] = _sam_or_plain_step(name, make_optimizer(name, ps, base))
        progress.finish()
    progress.start(f"{workload.name}: optimizer step, {len(steps)} variants in turn", 0.5 * len(steps))
    times = time_ms(steps, device, warmup, reps)
    launches = {name: count_launches(step, device) for name, step in steps.items()}  # state exists by now
    progress.finish()
    rows = []
    for name in variant_names:
        nbytes = n_params * bytes_per_param(("sam+" if name.startswith("sam-") else "") + kind, elem)
        ms = median(times[name])
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(model=workload.name, variant=name, params=n_params, tensors=len(params),
                         median_ms=ms, times_ms=times[name], spread=rel_spread(times[name]), launches=launches[name],
                         bytes_per_param=nbytes / n_params, gbs=gbs, roofline=gbs / copy_gbs))
    base = times["sam-baseline"]
    for r in rows:
        ratios = paired_ratios(times[r["variant"]], base)
        r["speedup_vs_baseline"] = median(ratios)
        r["speedup_quartiles"] = quartiles(ratios)
    return rows


def train_table(workload, variant_names, base, device, warmup, reps, batch_sizes, progress):
    rows = []
    n_params = sum(p.numel() for p in workload.model.parameters())
    for setting, bs in batch_sizes.items():
        batch = workload.make_batch(bs)
        steps, opts = {}, {}
        for name in variant_names:
            progress.start(f"{workload.name}: training, {setting} (batch {bs}), {name}: building", 0.1)
            model = copy.deepcopy(workload.model)
            params = norm_layer_param_groups(model) if name in SUBSET else list(model.parameters())
            opts[name] = make_optimizer(name, params, base)

            if name in FUNCTIONAL:
                def closure(model=model):
                    out = workload.forward(model, batch)
                    return workload.criterion(out, batch), out
            else:
                def closure(model=model):
                    loss = workload.loss(model, batch)
                    loss.backward()
                    return loss

            steps[name] = _sam_or_plain_step(name, opts[name], closure)
            progress.finish()
        progress.start(f"{workload.name}: training, {setting} (batch {bs}), {len(steps)} variants in turn",
                       4 * len(steps))
        times = time_ms(steps, device, warmup, reps)
        times = {name: [t / calls_per_round(name) for t in ts] for name, ts in times.items()}  # per step
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
                                     median_ms=ms, times_ms=times[name], spread=rel_spread(times[name]),
                                     samples_per_s=bs / (ms * 1e-3),
                                     held_bytes=held_bytes(opts[name]), peak_bytes=peaks.get(name), params=n_params))
        sgd = setting_rows[0]
        sam = [r for r in setting_rows if r["variant"].startswith("sam-") and r["variant"] != "sam-baseline"][-1]
        for r in setting_rows:
            # throughput ratios from the round-by-round pairs: the time of SGD's step over this one's
            vs_sgd = paired_ratios(r["times_ms"], sgd["times_ms"])
            r["ratio_vs_sgd"], r["ratio_vs_sgd_quartiles"] = median(vs_sgd), quartiles(vs_sgd)
            r["ratio_vs_sam"] = median(paired_ratios(r["times_ms"], sam["times_ms"]))
            r["extra_bytes_per_param"] = (r["held_bytes"] - sgd["held_bytes"]) / n_params
            if r["peak_bytes"] is not None:
                r["extra_peak_bytes_per_param"] = (r["peak_bytes"] - sgd["peak_bytes"]) / n_params
        rows += setting_rows
        del steps, opts
    return rows


def legend(names) -> list[str]:
    """What each variant name of the tables is, for the names that appear."""
    names = set(names)
    text = {
        "sgd": "sgd, adamw: torch's optimizer as constructed by default (its foreach or for-loop path), for scale",
        "sgd-fused": "sgd-fused, adamw-fused: torch's fused=True kernels: the floor a fused step is measured against",
        "sam-baseline": "sam-baseline: SAM as commonly written, a Python loop over the parameters (davda54/sam's "
                        "class) around the base optimizer: what FusedSAM replaces",
        "sam-torch": "sam-torch: FusedSAM's reference backend, one torch op per tensor: the oracle the fast paths "
                     "are tested against, written to be read, not to be fast (do not pick it for speed)",
        "sam-fast": "sam-cpu, sam-cuda, sam-triton: FusedSAM's fused backends (native C++ on the CPU or CUDA, "
                    "Triton kernels over device pointer tables)",
        "efficient": "interval, rst, gsam, looksam, msam, phase, psam, fsam, samon: the efficient family in training (interval: SAM every 5th "
                     "step; rst: randomized SAM, p = 0.5; gsam: GSAM, alpha 0.4; looksam: LookSAM, k = 5; msam: "
                     "Momentum-SAM, one forward/backward per step; phase: SAM on 1 step of every 4, the "
                     "per-step cost of a 25% SAM phase; psam, with --base adamw: the preconditioned "
                     "perturbation; fsam: Functional-SAM; samon: SAM-ON, the normalization layers perturbed "
                     "and the rest not), per step over whole cycles",
        "usam": "usam-*: the universal class (Frob-, Trace-, Det-SAM, n = 2 samples)",
    }
    keys = set()
    for n in names:
        if n in ("sgd", "adamw"):
            keys.add("sgd")
        elif n.endswith("-fused"):
            keys.add("sgd-fused")
        elif n in ("sam-baseline", "sam-torch"):
            keys.add(n)
        elif n.startswith("sam-"):
            keys.add("sam-fast")
        elif n in EFFICIENT:
            keys.add("efficient")
        elif n.startswith("usam-"):
            keys.add("usam")
    return ["  " + text[k] for k in text if k in keys]


def _fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _the_sam(rows) -> dict | None:
    """FusedSAM's row of a table: its last backend measured (a fused one when any ran, as the
    training table's "vs SAM" column takes it)."""
    sams = [r for r in rows if r["variant"].startswith("sam-") and r["variant"] != "sam-baseline"]
    return sams[-1] if sams else None


def _times(x: float, faster: str = "faster", slower: str = "slower") -> str:
    return f"{x:.2f}x {faster}" if x >= 1 else f"{1 / x:.2f}x {slower}"


def bottom_line(step_rows, train_rows) -> list[dict]:
    """Per model, the run's answer in figures: FusedSAM's optimizer step against the common
    per-parameter loop (sam-baseline), and each training setting's throughput relative to SGD of
    FusedSAM and of the common loop (ideal 0.5: two forward/backward passes per step). Every number
    is one of the table rows' (``speedup_vs_baseline``, ``ratio_vs_sgd``); ``text`` says it in words."""
    out = []
    for model in dict.fromkeys(r["model"] for r in list(step_rows) + list(train_rows)):
        steps = [r for r in step_rows if r["model"] == model]
        trains = [r for r in train_rows if r["model"] == model]
        sam = _the_sam(steps) or _the_sam(trains)
        if sam is None:
            continue
        name = sam["variant"]
        who = (f"FusedSAM's reference backend ({name})" if name == "sam-torch" else f"FusedSAM's step ({name})")
        entry = dict(model=model, sam=name, step_speedup_vs_baseline=None, training=[])
        parts = []
        row = next((r for r in steps if r["variant"] == name), None)
        if row is not None:
            entry["step_speedup_vs_baseline"] = row["speedup_vs_baseline"]
            parts.append(f"{who} is {_times(row['speedup_vs_baseline'])} than the common per-parameter SAM loop "
                         f"(sam-baseline)")
        for key in dict.fromkeys((r["setting"], r["batch_size"]) for r in trains):
            rs = {r["variant"]: r for r in trains if (r["setting"], r["batch_size"]) == key}
            if name not in rs or "sam-baseline" not in rs:
                continue
            fused, common = rs[name]["ratio_vs_sgd"], rs["sam-baseline"]["ratio_vs_sgd"]
            entry["training"].append(dict(setting=key[0], batch_size=key[1], sam_vs_sgd=fused, baseline_vs_sgd=common))
            parts.append(f"training ({key[0]}, batch {key[1]}) with {name} runs at {fused:.2f}x SGD's throughput "
                         f"against {common:.2f}x for the common loop (SGD = 1, higher is better; 0.5 would mean no "
                         f"cost beyond SAM's second forward/backward pass)")
        if parts:
            entry["text"] = f"{model}: " + "; ".join(parts)
            out.append(entry)
    return out


def report(env, copy_gbs, step_rows, train_rows, host_rows=(), pass_rows=()) -> str:
    busy = env.get("busy")
    mark = "  [BUSY MACHINE: timings doubtful]" if busy else ""
    out = [f"sam-fused bench: {env['device_name']} ({env['device']}, {env['threads']} threads on {env['cores']} cores), "
           f"torch {env['torch']}, triton {env['triton']}, commit {(env['commit'] or '?')[:10]}, {env['date']}"
           + (f"\nTHE MACHINE WAS BUSY: every timing below is doubtful ({busy})" if busy else ""),
           f"device copy bandwidth (read + write): {copy_gbs:.1f} GB/s; figures: median of {env['reps']} rounds; "
           "spread = interquartile range / median (lower: steadier); [quartiles] = first and third quartile", ""]
    if host_rows:
        r0 = host_rows[0]
        gpu = env["device"] == "cuda"
        out.append(f"Host cost: FusedSAM first_step + second_step ({r0['backend']} backend) vs one "
                   f"SGD(fused=True).step(), {r0['numel']}-element tensors, us per tensor (lower is better), "
                   "median [quartiles]" + (" (host wall time to enqueue; kernel time beside)" if gpu else "") + mark)
        headers = (["tensors", "grads", "SAM us", "fused SGD us", "SAM / SGD time (lower better)", "same addr"]
                   + (["SAM kernels us"] if gpu else []))
        out.append(_fmt_table(headers, format_host_rows(list(host_rows), torch.device(env["device"]))))
        out.append("")
    if pass_rows:
        out.append("Roofline: each pass alone, minimal bytes over the median time, as a fraction of the copy "
                   "bandwidth (higher is better; torch = torch's own fused optimizers on the same tensors)" + mark)
        out.append(_fmt_table(["shape", "params", "tensors", "dtype", "backend", "pass", "median ms [quartiles]", "GB/s",
                               "of copy bw"], roofline.format_rows(list(pass_rows))))
        out.append("")
    names = [r["variant"] for r in list(step_rows) + list(train_rows)]
    if names:
        out.append("Variants (\"speedup over sam-baseline\": the per-parameter loop's time over this row's, "
                   "above 1 is faster; \"throughput / SGD's\": this row's samples/s over SGD's, higher is better):")
        out += legend(names)
        out.append("")
    unit = "launches" if env["device"] == "cuda" else "ops"
    for model in dict.fromkeys(r["model"] for r in step_rows):
        rs = [r for r in step_rows if r["model"] == model]
        out.append(f"Optimizer step alone: {model}, {rs[0]['params'] / 1e6:.2f}M params in {rs[0]['tensors']} tensors"
                   + mark)
        out.append(_fmt_table(
            ["variant", "median ms", "spread", unit, "B/param", "GB/s", "of copy bw",
             "speedup over sam-baseline [quartiles]"],
            [[r["variant"], f"{r['median_ms']:.3f}", f"{100 * r['spread']:.0f}%", r["launches"],
              f"{r['bytes_per_param']:.0f}", f"{r['gbs']:.1f}", f"{100 * r['roofline']:.0f}%",
              f"{r['speedup_vs_baseline']:.2f}x [{r['speedup_quartiles'][0]:.2f}, {r['speedup_quartiles'][1]:.2f}]"]
             for r in rs]))
        out.append("")
    for key in dict.fromkeys((r["model"], r["setting"], r["batch_size"]) for r in train_rows):
        rs = [r for r in train_rows if (r["model"], r["setting"], r["batch_size"]) == key]
        out.append(f"Training: {key[0]}, {key[1]}, batch {key[2]}  (throughput relative to SGD: SGD = 1, higher is "
                   "better; 0.5 would mean no cost beyond SAM's second forward/backward pass)" + mark)
        universal = any(needs_closure(r["variant"]) for r in rs)
        sam = _the_sam(rs)
        headers = (["variant", "median ms", "spread", "samples/s", "throughput / SGD's [quartiles]"]
                   + ([f"throughput / {sam['variant']}'s"] if universal and sam else [])
                   + ["extra B/param vs SGD"])
        if rs[0]["peak_bytes"] is not None:
            headers.append("extra peak B/param vs SGD")
        table = []
        for r in rs:
            q = r["ratio_vs_sgd_quartiles"]
            row = [r["variant"], f"{r['median_ms']:.2f}", f"{100 * r['spread']:.0f}%", f"{r['samples_per_s']:.1f}",
                   f"{r['ratio_vs_sgd']:.3f} [{q[0]:.3f}, {q[1]:.3f}]"]
            row += [f"{r['ratio_vs_sam']:.3f}"] if universal and sam else []
            row += [f"{r['extra_bytes_per_param']:.1f}"]
            if r["peak_bytes"] is not None:
                row.append(f"{r['extra_peak_bytes_per_param']:.1f}")
            table.append(row)
        out.append(_fmt_table(headers, table))
        out.append("")
    for w in env.get("warnings", ()):
        out.append(f"WARNING: {w}")
    lines = bottom_line(step_rows, train_rows)
    if lines:
        if env.get("warnings"):
            out.append("")
        out.append("Bottom line" + (" (BUSY MACHINE: timings doubtful)" if busy else "") + ":")
        out += [f"  {b['text']}" for b in lines]
    return "\n".join(out)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = args.full or device.type == "cuda"
    load_start, cores = load(), cpu_count()
    busy_threads = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and load_start is not None and load_start > cores:
        busy_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        print(f"sam-fused bench: the machine is busy (load average {load_start:.1f} on {cores} cores): timing with "
              f"1 thread instead of {busy_threads} (--threads overrides)", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    reps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 30)
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
    models = args.model or (["resnet", "transformer"] if full else ["transformer"])
    tparams = args.transformer_params if args.transformer_params is not None else (
        1e8 if device.type == "cuda" else 2e6)
    names = variants(device, args.base, backends)
    universal = (["usam-frob", "usam-trace", "usam-det"] if args.universal else []) + (
        [n for n in EFFICIENT if args.base == "adamw" or n not in ADAM_ONLY] if args.efficient else [])
    workloads = [build(m, device, tparams, dtype) for m in models]
    host_counts = args.host_tensors if args.host_tensors is not None else (
        [100, 1000, 10000] if full else [100, 1000])
    host_backend = next((b for b in backends if b != "torch"), "torch")
    roof = None
    if args.roofline or (device.type == "cuda" and not args.no_roofline):
        roof = dict(sizes=args.roofline_sizes or roofline.default_sizes(device), mixes=list(args.roofline_mixes),
                    dtypes=[DTYPES[d] for d in args.roofline_dtypes], backends=[b for b in backends if b != "torch"])
        if not roof["backends"]:
            print(f"sam-fused bench: the roofline needs a fused backend (got {backends})", file=sys.stderr)
            return 2

    def sizes_of(w):
        if args.batch_size is not None:
            return {"custom": args.batch_size}
        return dict(w.batch_sizes) if full else {"compute-heavy": w.batch_sizes["compute-heavy"]}

    # task weights: about the share of the run each takes on a 2-core CPU (building a variant is quick)
    n_variants = len(names)
    total = 1 + 2 * len(host_counts)
    if roof is not None:
        total += 0.5 * (len(roof["sizes"]) + len(roof["mixes"])) * len(roof["dtypes"])
    for w in workloads:
        total += 0.1 * n_variants + 0.5 * n_variants
        if not args.no_train:
            total += len(sizes_of(w)) * (0.1 * (n_variants + len(universal)) + 4 * (n_variants + len(universal)))
    progress = Progress(total)

    progress.start("device copy bandwidth")
    copy_gbs = copy_bandwidth(device)
    progress.finish()
    env = environment(device)
    env.update(reps=reps, load_start=load_start, busy_threads=busy_threads, full=full)
    host_rows = []
    if host_counts:
        progress.start(f"host cost of a step on {', '.join(map(str, host_counts))} tiny tensors ({host_backend})",
                       2 * len(host_counts))
        host_rows = host_cost(device, host_backend, host_counts, reps=reps)
        progress.finish()
    pass_rows = []
    if roof is not None:
        progress.start("roofline: each pass alone", 0.5 * (len(roof["sizes"]) + len(roof["mixes"])) * len(roof["dtypes"]))
        pass_rows = roofline.roofline(device, roof["backends"], roof["sizes"], roof["mixes"], roof["dtypes"], copy_gbs,
                                      args.warmup, reps, tparams)
        progress.finish()
    step_rows, train_rows = [], []
    for w in workloads:
        step_rows += optimizer_step_table(w, names, args.base, device, dtype, args.warmup, reps, copy_gbs, progress)
        if not args.no_train:
            train_rows += train_table(w, names + universal, args.base, device, args.warmup, reps, sizes_of(w), progress)
    env["load_end"] = load()
    env["busy"] = busy_note(load_start, env["load_end"], cores) if device.type == "cpu" else None
    env["warnings"] = warnings_for(env, step_rows, train_rows, host_rows)
    print(report(env, copy_gbs, step_rows, train_rows, host_rows, pass_rows))
    if args.json:
        config = dict(device=str(device), model=models, full=full, backend=backends, base=args.base, dtype=args.dtype,
                      steps=reps, warmup=args.warmup, threads=torch.get_num_threads(), host_tensors=host_counts)
        if "transformer" in models or (roof is not None and "transformer" in roof["mixes"]):
            config["transformer_params"] = tparams
        if not args.no_train:
            config.update(batch_size={w.name: sizes_of(w) for w in workloads}, universal=args.universal,
                          efficient=args.efficient)
        if roof is not None:
            config.update(roofline_sizes=roof["sizes"], roofline_mixes=roof["mixes"],
                          roofline_dtypes=[str(d).replace("torch.", "") for d in roof["dtypes"]])
        config.update(json=str(args.json), command_line=getattr(args, "command_line", None))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(environment=env, config=config, copy_gbs=copy_gbs, base=args.base, dtype=args.dtype,
                       bottom_line=bottom_line(step_rows, train_rows), host_cost=host_rows, optimizer_step=step_rows,
                       training=train_rows, passes=pass_rows)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0
