"""Each pass of the fused SAM step timed alone, as a fraction of the device copy of the same run.

Passes (bytes per parameter, element size s; fp32: s = 4):

    norm                 R g (ASAM also R w)                       s (2 s)
    perturb              R w, g; W backup, w                       4 s
    restore+update sgd   R backup, g, m; W w, m  (momentum 0.9)    5 s
    restore+update adamw R backup, g, m, v; W w, m, v              7 s
    dots                 R g, aux (GSAM's and LookSAM's sums)      2 s
    sam step sgd         first_step + second_step, as a user calls them (norm + perturb + update)
                                                                   10 s
    msam step sgd        Momentum-SAM's step(): R w, g, m; W w, m, then R w, m; W w
                                                                   8 s
    msam step adamw      the same with Adam's second moment        10 s

and beside them torch's own fused optimizers on the same tensors: ``SGD(fused=True)`` (5 s) and
``AdamW(fused=True)`` (7 s), the floor a fused SAM step is measured against. Achieved GB/s is
these minimal bytes over the median time; its fraction of the copy bandwidth measured in the same
run (read + write, a 1 GiB copy on a GPU, 64 MiB on the CPU) is the fraction of the memory roofline
the pass reaches.

Shapes: one tensor of each of ``sizes`` parameters, and three realistic mixes: the bench's
transformer (``nn.Transformer`` 6+6 layers, 187 tensors), a ResNet-50-like mix (the 161 tensors
of ResNet-50's convolutions, batch norms and head, 25.6M parameters) and an LLM-like mix (24
decoder layers at width 1792 and a 32000-token embedding: 194 tensors, ~0.98B parameters). On the
CPU the mixes are scaled down, tensor count kept, to the largest single size.

Each pass is timed through the backend's own launch functions on the cached plan of a warmed-up
optimizer (host planning included, as a step pays it; on a GPU it hides under the kernels from a
few million parameters on). The perturb pass is timed with rho = 1e-6 so repeated calls keep the
weights finite.
"""

from __future__ import annotations

import math

import torch

from ...optim import MSAM, FusedSAM
from ...plan import ZeroBuffers
from .measure import median, quartiles, sync, time_ms

MIXES = ("transformer", "resnet50", "llm")
# pass name -> bytes per parameter in elements of the parameter's dtype
PASS_ELEMENTS = {"norm": 1, "perturb": 4, "restore+update sgd": 5, "restore+update adamw": 7, "dots": 2,
                 "sam step sgd": 10, "msam step sgd": 8, "msam step adamw": 10, "torch fused sgd": 5,
                 "torch fused adamw": 7}


def resnet50_numels() -> list[int]:
    """The parameter tensors of torchvision's ResNet-50 (weights and biases of every conv, batch
    norm and the head), from its layout: 161 tensors, 25,557,032 parameters."""
    out = [64 * 3 * 7 * 7, 64, 64]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out += [cin * width, width, width, width * width * 9, width, width, width * 4 * width, 4 * width,
                    4 * width]
            if b == 0:
                out += [cin * 4 * width, 4 * width, 4 * width]
            cin = 4 * width
    return out + [2048 * 1000, 1000]


def llm_numels(layers: int = 24, width: int = 1792, vocab: int = 32000) -> list[int]:
    """A decoder-only LLM: per layer q, k, v, o (d x d), an MLP (d x 4d, 4d x d) and two norms; an
    embedding and a final norm (tied head): 194 tensors, ~0.98B parameters."""
    per_layer = [width * width] * 4 + [width * 4 * width, 4 * width * width, width, width]
    return [vocab * width] + per_layer * layers + [width]


def transformer_numels(params: float) -> list[int]:
    from .models import Seq2Seq, transformer_width

    with torch.device("meta"):
        model = Seq2Seq(transformer_width(params), 6)
    return [p.numel() for p in model.parameters()]


def shapes(device: torch.device, sizes: list[int], mixes: list[str], transformer_params: float) -> list[tuple[str, list[int]]]:
    """(label, numels) of every shape the roofline runs: one tensor per size, then the mixes (scaled
    down on the CPU, tensor count kept, to the largest size)."""
    out = [("1 tensor", [int(n)]) for n in sizes]
    cap = None if device.type == "cuda" else max(sizes)
    for mix in mixes:
        numels = {"transformer": lambda: transformer_numels(transformer_params), "resnet50": resnet50_numels,
                  "llm": llm_numels}[mix]()
        total = sum(numels)
        if cap is not None and total > cap:
            numels = [max(1, round(n * cap / total)) for n in numels]
        out.append((mix, numels))
    return out


def _params(numels: list[int], device: torch.device, dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    """Random parameters and gradients made on the device itself (1B values drawn on the host took
    seconds each)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in numels:
        p = torch.nn.Parameter(torch.randn(n, generator=gen, device=device, dtype=dtype))
        p.grad = torch.randn(n, generator=gen, device=device, dtype=dtype)
        params.append(p)
    return params


def _sam_passes(numels, device, dtype, backend: str, warmup: int, reps: int) -> dict[str, list[float]]:
    """Times (ms) of norm, perturb, dots, restore+update for SGD-momentum and AdamW, and a whole
    SAM + SGD-momentum step, on one set of tensors."""
    times: dict[str, list[float]] = {}
    for base, kw in (("sgd", dict(momentum=0.9)), ("adamw", dict(weight_decay=0.01))):
        cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
        params = _params(numels, device, dtype, seed=1)
        opt = FusedSAM(params, cls, rho=1e-6, lr=1e-6, backend=backend, **kw)
        for _ in range(2):  # state created, plans and tables cached
            opt.first_step()
            opt.second_step()
        be = opt._backend
        plan = opt._step_plan()
        launches = be._update_launches("sgd" if base == "sgd" else "adam", True, plan)
        if launches is None or plan.slow:
            raise RuntimeError(f"the {backend} backend takes the generic path for these tensors: nothing fused to time")

        def update():
            for bucket, u in launches:
                be.launch_update(bucket, u, None)

        fns = {f"restore+update {base}": update}
        if base == "sgd":
            sq, norm = be._scalars(device)
            aux = ZeroBuffers()
            out = be._dots_out(device)

            def norm_pass():
                be.launch_sq(plan.buckets, None, sq, norm, None)

            def perturb_pass():
                for bucket in plan.buckets:
                    be.launch_perturb(bucket, norm, None)

            def dots_pass():
                be.launch_dots(plan.buckets, aux, out, None)

            def step():
                opt.first_step()
                opt.second_step()

            fns = {"norm": norm_pass, "perturb": perturb_pass, "dots": dots_pass, **fns, "sam step sgd": step}
        times.update(time_ms(fns, device, warmup, reps))
        plan = launches = be = opt = params = None
    return times


def _msam_passes(numels, device, dtype, backend: str, warmup: int, reps: int) -> dict[str, list[float]]:
    """Times (ms) of Momentum-SAM's whole step (its two passes) over SGD-momentum and AdamW."""
    times: dict[str, list[float]] = {}
    for base, cls, kw in (("sgd", torch.optim.SGD, dict(momentum=0.9)),
                          ("adamw", torch.optim.AdamW, dict(weight_decay=0.01))):
        params = _params(numels, device, dtype, seed=3)
        opt = MSAM(params, cls, rho=1e-6, lr=1e-6, backend=backend, **kw)
        for _ in range(2):  # state created, the plan and its tables cached
            opt.step()
        if opt._backend.plan().slow:
            raise RuntimeError(f"the {backend} backend takes the reference ops for these tensors: nothing fused to time")
        times.update(time_ms({f"msam step {base}": opt.step}, device, warmup, reps))
        opt = params = None
    return times


def _torch_fused(numels, device, dtype, warmup: int, reps: int) -> dict[str, list[float]]:
    times = {}
    for name, cls, kw in (("torch fused sgd", torch.optim.SGD, dict(momentum=0.9)),
                          ("torch fused adamw", torch.optim.AdamW, dict(weight_decay=0.01))):
        params = _params(numels, device, dtype, seed=2)
        try:
            opt = cls(params, lr=1e-6, fused=True, **kw)
            opt.step()
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
            continue
        times.update(time_ms({name: opt.step}, device, warmup, reps))
    return times


def roofline(device: torch.device, backends: list[str], sizes: list[int], mixes: list[str], dtypes: list[torch.dtype],
             copy_gbs: float, warmup: int, reps: int, transformer_params: float) -> list[dict]:
    """One row per (shape, dtype, backend, pass): median ms with quartiles, GB/s of the minimal
    bytes and its fraction of ``copy_gbs``."""
    rows = []
    for label, numels in shapes(device, sizes, mixes, transformer_params):
        n = sum(numels)
        for dtype in dtypes:
            elem = torch.tensor([], dtype=dtype).element_size()
            measured = [(b, {**_sam_passes(numels, device, dtype, b, warmup, reps),
                             **_msam_passes(numels, device, dtype, b, warmup, reps)}) for b in backends]
            measured.append(("torch", _torch_fused(numels, device, dtype, warmup, reps)))
            for backend, times in measured:
                for name, ts in times.items():
                    ms = median(ts)
                    q1, q3 = quartiles(ts)
                    gbs = PASS_ELEMENTS[name] * elem * n / (ms * 1e-3) / 1e9
                    rows.append({"pass": name, "shape": label, "params": n, "tensors": len(numels),
                                 "dtype": str(dtype).replace("torch.", ""), "backend": backend, "median_ms": ms,
                                 "q1_ms": q1, "q3_ms": q3, "bytes_per_param": PASS_ELEMENTS[name] * elem,
                                 "gbs": gbs, "fraction_of_copy": gbs / copy_gbs})
            sync(device)
    return rows


def format_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["shape"], f"{r['params'] / 1e6:.1f}M", str(r["tensors"]), r["dtype"], r["backend"], r["pass"],
             f"{r['median_ms']:.3f} [{r['q1_ms']:.3f}, {r['q3_ms']:.3f}]", f"{r['gbs']:.1f}",
             f"{100 * r['fraction_of_copy']:.0f}%"] for r in rows]


def default_sizes(device: torch.device) -> list[int]:
    return [16_000_000, 64_000_000, 256_000_000, 1_000_000_000] if device.type == "cuda" else [1_000_000, 4_000_000]


def parse_sizes(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        value = float(part)
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(f"a roofline size must be a positive number of parameters, got {part!r}")
        out.append(int(value))
    return out
