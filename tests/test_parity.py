"""Every backend against the torch reference and against a float64 transcription of the formulas.

7 steps; sizes 1, 97, 278011, 0-dim, empty, a transposed view and a strided slice; two param
groups with their own rho and lr; a step where one parameter has no grad. Parameters and every
state entry are compared. Tolerances: ``tests/tolerances.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import harness
from harness import assert_close, max_err, run_backend, run_float64
from tolerances import FP32, LOWP_FACTOR, lowp_floor

from sam_fused import FusedSAM, available_backends

SAM_VARIANTS = {"sam": (False, 0.0), "asam": (True, 0.0), "asam_eta": (True, 0.01)}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# every fast path that runs here: triton (interpreted on the CPU), and the native "cpu" or "cuda"
FAST_BACKENDS = [b for b in available_backends(DEVICE) if b != "torch"]


@functools.lru_cache(maxsize=None)
def cached_run(backend, dtype, opt_name, variant, rho_scale=1.0):
    adaptive, eta = SAM_VARIANTS[variant]
    params, states, _ = run_backend(backend, dtype, DEVICE, opt_name, adaptive, eta, rho_scale=rho_scale)
    return params, states


@functools.lru_cache(maxsize=None)
def cached_float64(opt_name, variant, dtype):
    adaptive, eta = SAM_VARIANTS[variant]
    return run_float64(opt_name, adaptive, eta, dtype=dtype)


def _state_tensors(state: dict):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"}


def compare_fp32(params, states, ref_params, ref_states, tol_name):
    atol, rtol = FP32[tol_name]
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, atol, rtol, f"param {harness.SHAPES[i]}")
    for i, (s, r) in enumerate(zip(states, ref_states)):
        assert set(s) == set(r), f"state keys of {harness.SHAPES[i]}: {sorted(s)} vs {sorted(r)}"
        for k, v in _state_tensors(s).items():
            assert_close(v, r[k], atol, rtol, f"state {k!r} of {harness.SHAPES[i]}")
        if "step" in s:
            assert float(s["step"]) == float(r["step"])


@pytest.mark.parametrize("variant", list(SAM_VARIANTS))
@pytest.mark.parametrize("opt_name", list(harness.OPTIMIZERS))
def test_reference_matches_float64(opt_name, variant):
    params, states = cached_run("torch", torch.float32, opt_name, variant)
    ws, st64 = cached_float64(opt_name, variant, torch.float32)
    compare_fp32(params, states, ws, st64, "fp32_vs_float64")


# Interpreted Triton in `make test`: every base optimizer once (each update kernel variant), SAM and
# ASAM with and without eta spread over them; every layout in each run. `make test-full`: all 21.
QUICK_FP32 = [dict(opt_name="sgd", variant="sam"), dict(opt_name="sgd_momentum_wd", variant="asam"),
              dict(opt_name="sgd_nesterov", variant="asam_eta"), dict(opt_name="sgd_dampening_maximize", variant="sam"),
              dict(opt_name="adam", variant="asam_eta"), dict(opt_name="adamw", variant="asam"),
              dict(opt_name="adam_maximize", variant="sam")]


@pytest.mark.quick_subset("triton", QUICK_FP32)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("variant", list(SAM_VARIANTS))
@pytest.mark.parametrize("opt_name", list(harness.OPTIMIZERS))
def test_fast_matches_reference_fp32(backend, opt_name, variant):
    params, states = cached_run(backend, torch.float32, opt_name, variant)
    ref_params, ref_states = cached_run("torch", torch.float32, opt_name, variant)
    compare_fp32(params, states, ref_params, ref_states, "fast_vs_reference")
    ws, st64 = cached_float64(opt_name, variant, torch.float32)
    compare_fp32(params, states, ws, st64, "fp32_vs_float64")


# each low-precision dtype, update kind and perturbation once (the fp32 subset covers their products)
@pytest.mark.quick_subset("triton", [
    dict(dtype=torch.bfloat16, opt_name="adamw", variant="asam_eta"),
    dict(dtype=torch.float16, opt_name="sgd_momentum_wd", variant="sam")])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("variant", ["sam", "asam_eta"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "sgd_nesterov", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_low_precision(backend, dtype, opt_name, variant):
    """Error of the fast path vs float64 <= 2x the error of the reference run in the same dtype."""
    params, states = cached_run(backend, dtype, opt_name, variant)
    ref_params, ref_states = cached_run("torch", dtype, opt_name, variant)
    ws, st64 = cached_float64(opt_name, variant, dtype)
    for i, (p, r, w) in enumerate(zip(params, ref_params, ws)):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        bound = LOWP_FACTOR * max_err(r, w) + lowp_floor(dtype, w)
        assert max_err(p, w) <= bound, f"param {harness.SHAPES[i]}: {max_err(p, w):.4g} > {bound:.4g}"
    for s, r, s64 in zip(states, ref_states, st64):
        assert set(s) == set(r)
        for k, v in _state_tensors(s).items():
            assert v.dtype == dtype == r[k].dtype
            bound = LOWP_FACTOR * max_err(r[k], s64[k]) + lowp_floor(dtype, s64[k])
            assert max_err(v, s64[k]) <= bound, f"state {k}: {max_err(v, s64[k]):.4g} > {bound:.4g}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_generic_base_optimizer_matches_reference(backend):
    """Any other base optimizer: fused restore, then its own step(). RMSprop divides by
    sqrt(square_avg): where a gradient is near zero it turns a rounding difference of the norm
    (another summation order) into a large one, by an amount that depends on the machine's
    arithmetic, so no fixed fp32 tolerance, nor one built from the reference's own error, holds
    everywhere. The runs go in lock step (tests/lockstep.py): every step from the reference's
    weights and state, w + e against the FP32 table, the update against the bound of one RMSprop
    step's conditioning (tolerances.py)."""
    from lockstep import run_lockstep

    for variant in ("sam", "asam_eta"):
        adaptive, eta = SAM_VARIANTS[variant]
        assert run_lockstep(backend, FusedSAM, 7, adaptive=adaptive, eta=eta) == 7


@pytest.mark.quick_subset("triton", [])  # a property of the table: the native backend shows it in `make test`
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_tolerance_catches_a_1_percent_error(backend):
    """The fp32 tolerances are tight enough to see rho off by 1%."""
    params, _ = cached_run(backend, torch.float32, "sgd_momentum_wd", "sam", rho_scale=1.01)
    ref_params, _ = cached_run("torch", torch.float32, "sgd_momentum_wd", "sam")
    atol, rtol = FP32["fast_vs_reference"]
    with pytest.raises(AssertionError):
        assert_close(params[2], ref_params[2], atol, rtol, "278011")
    ws, _ = cached_float64("sgd_momentum_wd", "sam", torch.float32)
    atol, rtol = FP32["fp32_vs_float64"]
    with pytest.raises(AssertionError):
        assert_close(params[2], ws[2], atol, rtol, "278011")


def test_available_backends_lists_reference():
    assert "torch" in available_backends("cpu")
