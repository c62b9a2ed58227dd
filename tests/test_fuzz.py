"""Differential fuzzing: every fast backend against the torch reference on random parameter sets.

Hypothesis draws 1-4 parameters (sizes around the 4096-element block and 65536-element chunk
boundaries, 0-dim, empty; contiguous, transposed, strided, channels_last dense and not; every
dtype), grads with their parameter's strides or contiguous, one or two param groups, grads missing
at random, SAM or ASAM, SGD-momentum or AdamW, 1-3 steps. The oracle: in fp32 the FP32 table
against the fp32 reference (both base optimizers are well conditioned here: AdamW's eps is 0.05);
in bf16/fp16 the flash-attention rule (the fast path's error against the reference run in float64
at most LOWP_FACTOR times the error of the reference run in that dtype, plus the dtype's floor);
in fp64 that rule with the reference exact, so the floor alone (tolerances.py).
Derandomized; SAM_FUSED_FUZZ_EXAMPLES sets the number of examples (default 10 per backend).
"""

from __future__ import annotations

import os

import pytest
import torch

from sam_fused import FusedSAM, available_backends

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tolerances import FP32, FP64_FLOOR, LOWP_FACTOR, LOWP_FLOOR, lowp_floor  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST = [b for b in available_backends(DEVICE) if b != "torch"]
EXAMPLES = int(os.environ.get("SAM_FUSED_FUZZ_EXAMPLES", "10"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FLOOR = {torch.float64: FP64_FLOOR, **LOWP_FLOOR}
SIZES = [1, 3, 4095, 4096, 4097, 65535, 65536, 65537]
LAYOUTS = ["flat", "zero-dim", "empty", "transposed", "strided", "channels_last", "channels_last_strided"]


def make(layout: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 tensor with ``layout``; ``n`` sets its size where the layout allows."""
    if layout == "flat":
        return torch.randn(n, generator=gen, dtype=torch.float64)
    if layout == "zero-dim":
        return torch.randn((), generator=gen, dtype=torch.float64)
    if layout == "empty":
        return torch.randn(0, 3, generator=gen, dtype=torch.float64)
    if layout == "transposed":
        return torch.randn(max(n // 7, 1), 7, generator=gen, dtype=torch.float64).t()
    if layout == "strided":
        return torch.randn(max(n // 4, 1), 8, generator=gen, dtype=torch.float64)[:, ::2]
    x = torch.randn(2, 3, 4, max(n // 24, 1), generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    return x if layout == "channels_last" else x[..., ::2]


def like(t: torch.Tensor, values: torch.Tensor, dtype, device) -> torch.Tensor:
    """``values`` (float64, t's shape) in dtype/device with t's strides when t is dense, else contiguous."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device) if _dense(t) else \
        torch.empty(t.shape, dtype=dtype, device=device)
    return out.copy_(values)


def _dense(t):
    from sam_fused.layout import is_dense

    return is_dense(t)


param_spec = st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(SIZES), st.sampled_from(DTYPES),
                       st.booleans())  # (layout, size, dtype, grad contiguous instead of like the param)
case = st.fixed_dictionaries(dict(
    params=st.lists(param_spec, min_size=1, max_size=4),
    two_groups=st.booleans(),
    adaptive=st.booleans(),
    adamw=st.booleans(),
    steps=st.integers(1, 3),
    missing=st.lists(st.integers(0, 3), max_size=2),
    seed=st.integers(0, 2**16),
))


def run(backend: str, c: dict, dtype_override=None):
    gen = torch.Generator().manual_seed(c["seed"])
    params, grads_src = [], []
    for layout, n, dtype, contiguous_grad in c["params"]:
        w = make(layout, n, gen)
        dt = dtype_override or dtype
        p = torch.nn.Parameter(like(w, w, dt, DEVICE) if layout != "strided" else
                               torch.zeros(w.shape[0], 8, dtype=dt, device=DEVICE)[:, ::2].copy_(w))
        params.append(p)
        grads_src.append((torch.rand(w.shape, generator=gen, dtype=torch.float64) + 0.5,
                          torch.randn(w.shape, generator=gen, dtype=torch.float64), contiguous_grad))
    half = max(len(params) // 2, 1)
    groups = [{"params": params[:half], "rho": 0.5}] + (
        [{"params": params[half:], "rho": 0.2, "lr": 0.02}] if c["two_groups"] and params[half:] else [])
    if not c["two_groups"] or not params[half:]:
        groups[0]["params"] = params
    cls, kw = (torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)) if c["adamw"] else \
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2))
    opt = FusedSAM(groups, cls, adaptive=c["adaptive"], eta=0.01 if c["adaptive"] else 0.0, backend=backend, **kw)
    for step in range(c["steps"]):
        missing = set(c["missing"]) if step == c["steps"] - 1 else set()
        for phase in (0, 1):
            for i, (p, (a, b, contiguous_grad)) in enumerate(zip(params, grads_src)):
                if i in missing:
                    p.grad = None
                    continue
                g = a * p.detach().double().cpu() + b + 0.1 * phase
                p.grad = (torch.empty(p.shape, dtype=p.dtype, device=DEVICE) if contiguous_grad
                          else torch.empty_like(p, memory_format=torch.preserve_format)).copy_(g)
            (opt.first_step if phase == 0 else opt.second_step)()
    return params, opt


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def _fp32_close(a, b, what):
    atol, rtol = FP32["fast_vs_reference"]
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.all((x - y).abs() <= atol + rtol * y.abs()), f"{what}: {err(x, y):.3g} apart"


@pytest.mark.parametrize("backend", FAST)
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: under the interpreter it takes minutes
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(c=case)
def test_fast_backend_matches_reference(backend, c):
    fast, fopt = run(backend, c)
    ref, ropt = run("torch", c)
    exact, eopt = run("torch", c, dtype_override=torch.float64)
    for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
        assert f.dtype == r.dtype and f.stride() == r.stride()
        fs, rs, es = fopt.state.get(f, {}), ropt.state.get(r, {}), eopt.state.get(e, {})
        assert set(fs) == set(rs)
        pairs = [(f"param {i} {c['params'][i]}", f, r, e)] + [
            (f"state {k} of param {i}", v, rs[k], es[k]) for k, v in fs.items() if k != "step"]
        for k in fs:
            if k == "step":
                assert float(fs[k]) == float(rs[k])
        for what, a, b, x in pairs:
            if f.dtype == torch.float32:
                _fp32_close(a, b, what)
                continue
            bound = LOWP_FACTOR * err(b, x) + lowp_floor(f.dtype, x, FLOOR)
            assert err(a, x) <= bound, f"{what}: {err(a, x):.3g} > {bound:.3g}"
