"""Every tolerance the tests use, with the reason it is what it is.

Comparisons are over 7 SAM steps on the parameter set of ``tests/harness.py`` (sizes up to
278,011), parameters and every optimizer-state entry. A tolerance must be able to fail:
``test_tolerance_catches_a_1_percent_error`` checks that a 1% change of rho breaks each fp32 one.
"""

import torch

# (atol, rtol) for fp32, per comparison.
FP32 = {
    # Fast path vs the torch reference, both fp32. The global norm is summed in a different order
    # (per-program partials vs torch's pairwise sum): relative difference ~1e-7 on 278k terms; each
    # elementwise formula may round differently by an ulp (FMA contraction, operation order). Seven
    # steps with |dg/dw| <= ~2.3 grow that to a few 1e-7; 1e-5 leaves a margin and still fails
    # on any formula error (a 1% error in rho moves weights by >1e-4).
    "fast_vs_reference": (1e-5, 1e-5),
    # fp32 implementation vs the float64 transcription of the formulas: fp32 rounding (6e-8
    # relative) per operation, ~20 operations per step, 7 steps, values O(1)-O(10).
    "fp32_vs_float64": (2e-5, 2e-5),
    # Global gradient norm vs float64: one fp32 sum of up to 278k squares.
    "norm_vs_float64": (0.0, 1e-5),
    # A GradScaler run vs the same run unscaled: with a power-of-two scale every scaled gradient is
    # exactly scale * g and every unscaling exact, so the runs agree bit for bit; with another
    # scale each gradient element is rounded twice (scaled in backward, unscaled in the kernel):
    # 1 ulp per element per pass, carried over 3 steps of a small MLP with lr 0.1.
    "amp_vs_fp32": (1e-6, 1e-5),
    # Two ranks vs one process: the gradients are averaged by an all-reduce (DDP) or a
    # reduce-scatter (FSDP2) instead of one mean over the global batch, and the norm is a sum of two
    # local sums: each rounds differently by an ulp; 3 steps of a small MLP with lr 0.1 carry it
    # to ~1e-7 (3e-8 measured); a wrong norm (a local one, or one counted twice) is off by >1e-3.
    "distributed_vs_single": (1e-6, 1e-5),
    # DeepSpeed ZeRO-1/2 on two ranks vs one process: as above (the gradient is reduced and
    # averaged by the engine, the norm is the sum of two partition sums), over 3 steps with
    # gradient accumulation 1 or 2; a SAM step without the perturbation is off by >1e-3.
    "deepspeed_vs_single": (1e-6, 1e-5),
}

# DeepSpeed with bf16 working weights vs fp32 single-process SAM, 3 steps (tests/test_deepspeed.py):
# each forward reads bf16 weights (relative rounding 2**-9 of values up to ~0.5), the
# gradient is bf16 or fp32, the update runs on fp32 master weights: 1.8e-3 to 1.9e-3 apart (measured),
# 4e-3 leaves a factor 2. The control
# (fp32 without the perturbation) must be ``control_factor`` times further from SAM than that.
BF16_DEEPSPEED = {"atol": 4e-3, "control_factor": 2.0}

# Adam's step lr * m / (sqrt(v) + eps) turns an absolute gradient error d into an update error of
# up to lr * d / eps where |g| << eps, and the next gradient carries it on (|dg/dw| <= 2.3 here).
# With lr * 2.3 / eps > 1 the error grows geometrically over the steps: with the defaults
# (eps=1e-8) and even with eps=1e-3 at lr=0.05, fp32 and float64 runs were measured 5e-4 to 9e-4
# apart on a few elements, and no fp32 tolerance could hold. The Adam configurations therefore use
# lr <= 0.01 and eps >= 0.05 (harness.ADAM_LRS, harness.OPTIMIZERS), a contraction (factor <= 0.5),
# so every fp32 difference stays at rounding level and the FP32 table applies unchanged.

# Low precision, the flash-attention rule: the fast path's max error against float64 is at most
# LOWP_FACTOR times the error of the torch reference run in the same low precision, plus a floor
# for elements where the reference happens to be exact.
LOWP_FACTOR = 2.0
# fp32 paths whose conditioning depends on the data (RMSprop divides by sqrt(square_avg) + eps) get
# no bound built from another run's error: the fp32 reference's own error against float64 moves
# with the CPU's arithmetic (AVX-512 against AVX2 kernels: 8.35e-06 on one machine where the bound
# from another was 8.03e-06). They run in lock step instead (tests/lockstep.py): every step from
# the reference's weights and state, each quantity compared where it is well conditioned, and the
# update against rmsprop_step_bound below, which holds by construction.
# One fp32 rounding: half an ulp, 2**-24 relative. A quantity computed from nearly equal inputs by
# the same code rounds on either side of at most a few boundaries; ROUNDINGS of them per operation
# leave a margin.
FP32_U = 2.0**-24
ROUNDINGS = 4


def rmsprop_step_bound(g_fast, g_ref, w, square_avg, momentum_buffer, *, lr, alpha, eps, momentum,
                       weight_decay) -> dict:
    """How far one torch.optim.RMSprop step (not centered) can move its results when the same
    weights ``w`` and state (``square_avg``, ``momentum_buffer``; None before the first step) meet
    two gradients ``g_fast`` and ``g_ref``: elementwise bounds (float64) on the differences of the
    new ``"weight"``, ``"square_avg"`` and ``"momentum_buffer"``.

    With g' = g + wd w, v = alpha v0 + (1 - alpha) g'^2, f = g' / (sqrt(v) + eps):
      * |dv| <= (1 - alpha) (|g'_a| + |g'_b|) |dg|;
      * f is monotone in g' with slope at most 1 / (sqrt(v(xi)) + eps) for xi between the two
        gradients, and sqrt(v(xi)) >= sqrt(alpha v0 + (1 - alpha) m^2), m the smaller magnitude
        when both have one sign, else 0: |df| <= |dg| / (sqrt(alpha v0 + (1 - alpha) m^2) + eps);
      * buf = momentum buf0 + f and w' = w - lr buf carry |df| over, times lr for the weight;
    each result plus ROUNDINGS roundings of its own size. A near-zero gradient makes the slope up
    to 1/eps: that is the conditioning, computed here, not guessed from another run."""
    u = ROUNDINGS * FP32_U
    ga = g_fast.detach().double() + weight_decay * w.detach().double()
    gb = g_ref.detach().double() + weight_decay * w.detach().double()
    v0 = torch.zeros_like(gb) if square_avg is None else square_avg.detach().double()
    b0 = torch.zeros_like(gb) if momentum_buffer is None else momentum_buffer.detach().double()
    dg = (ga - gb).abs() + u * gb.abs()  # the weight decay's addition rounds too
    m = torch.where(ga * gb > 0, torch.minimum(ga.abs(), gb.abs()), torch.zeros_like(gb))
    v = alpha * v0 + (1 - alpha) * gb * gb
    f = gb / (v.sqrt() + eps)
    df = dg / ((alpha * v0 + (1 - alpha) * m * m).sqrt() + eps) + u * f.abs()
    buf = momentum * b0 + f
    dbuf = df + u * (momentum * b0.abs() + f.abs())
    w_new = w.detach().double() - lr * buf
    return {
        "square_avg": (1 - alpha) * (ga.abs() + gb.abs()) * dg + u * v,
        "momentum_buffer": dbuf,
        "weight": lr * dbuf + u * (w.detach().double().abs() + lr * buf.abs() + w_new.abs()),
    }


# float64 parameters: the global norm is an fp32 sum for every dtype, so two paths that sum in
# another order disagree by ~1e-7 relative in the norm and so in each perturbation e (|e| <= rho
# <= 0.5 in the tests), although each one's float64 arithmetic is otherwise exact.
FP64_FLOOR = 1e-7
# The floor is relative to the size of the values: two ulps of the largest expected value (at
# least of 1.0). An absolute floor failed on an H200 (the CUDA reference rounded a bf16 momentum
# buffer of 5.04 exactly, the fast path 1.6 ulps off: 0.049 against a floor of 0.01), the same
# rule that holds here, since bf16's ulp at 5 is 0.031.
LOWP_ULPS = 2
LOWP_FLOOR = {torch.bfloat16: LOWP_ULPS * 2.0**-7, torch.float16: LOWP_ULPS * 2.0**-10}


def lowp_floor(dtype: torch.dtype, expected: torch.Tensor, floors: dict | None = None) -> float:
    """The floor of the low-precision rule for a comparison against ``expected``: the dtype's
    floor (``floors`` or LOWP_FLOOR) times the largest magnitude in ``expected`` (at least 1)."""
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return (floors or LOWP_FLOOR)[dtype] * scale
