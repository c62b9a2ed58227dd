"""GSAM and LookSAM: the reference against float64 transcriptions of their formulas, every fast
backend against the reference over several steps (odd shapes and layouts, two groups, a missing
grad at step 3), exact reductions to SAM, checkpoints and refusals.

The problem is tests/harness.py's; tolerances come from tests/tolerances.py (the FP32 table and
the low-precision rule), as for FusedSAM.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import harness
from harness import GROUP_OF, RHOS, active_at, base_update, dot, grad_fn, lrs_of, max_err, problem, run_backend, sam_point
from sam_fused import GSAM, FusedSAM, LookSAM, RhoFollowsLR, available_backends
from tolerances import FP32, LOWP_FACTOR, lowp_floor
from test_parity import compare_fp32

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST = [b for b in available_backends(DEVICE) if b != "torch"]
EPS = 1e-12
ALPHA = 0.4
K = 3
LOOK_ALPHA = 0.7
OPTS = ["sgd_momentum_wd", "adamw"]
# LookSAM's steps in between amplify the rounding of g_v by alpha * ||g|| / ||g_v||: with the
# harness's rho that ratio is ~95 (g_v is ~1% of g) and fp32 runs drift 3.5e-5 from float64 on a
# few elements, past every fp32 tolerance. Ten times the radius makes g_v ten times larger and the
# amplification ~7, so the FP32 table applies unchanged (see tolerances.py).
LOOK_RHO = 10.0


# ---------------------------------------------------------------------- float64 transcriptions
def gsam64(opt_name, alpha=ALPHA, steps=7, dtype=torch.float32, adaptive=False, eta=0.0):
    """g_p - alpha * (g - cos ||g|| g_p / (||g_p|| + eps)), cos = <g, g_p> / (||g|| ||g_p|| + eps);
    with ``adaptive`` the perturbation is ASAM's, the decomposition of the raw gradients."""

    def combine(g, gp):
        ng, ngp = math.sqrt(dot(g, g)), math.sqrt(dot(gp, gp))
        cos = dot(g, gp) / (ng * ngp + EPS)
        return {i: gp[i] - alpha * (g[i] - cos * ng * gp[i] / (ngp + EPS)) for i in g}

    return harness.run_float64(opt_name, adaptive=adaptive, eta=eta, steps=steps, dtype=dtype, combine=combine)


def looksam64(opt_name, k=K, alpha=LOOK_ALPHA, steps=7, dtype=torch.float32):
    """SAM on steps 0, k, 2k, ... keeping g_v = g_s - (<g, g_s> / ||g||^2) g; otherwise the update
    uses g + alpha ||g|| / ||g_v|| g_v."""
    weights, coefs = problem(0)
    ws = [w.to(dtype).double().clone() for w in weights]
    state = [dict() for _ in ws]
    gv = {i: torch.zeros_like(w) for i, w in enumerate(ws)}
    lrs = lrs_of(opt_name)
    for step in range(steps):
        active = active_at(step)
        if step % k == 0:
            g, _, gs = sam_point(ws, coefs, active, rho_scale=LOOK_RHO)
            proj = dot(g, gs) / (dot(g, g) + EPS)
            for i in active:
                gv[i] = gs[i] - proj * g[i]
            use = gs
        else:
            g = {i: grad_fn(ws[i], coefs[i]) for i in active}
            ng = math.sqrt(dot(g, g))
            nv = math.sqrt(sum(float((gv[i] ** 2).sum()) for i in active))
            use = {i: g[i] + alpha * (ng / (nv + EPS)) * gv[i] for i in active}
        for i in active:
            ws[i] = base_update(opt_name, ws[i], use[i], state[i], lrs[GROUP_OF[i]])
    return ws, state, gv


def run_gsam(backend, opt_name, dtype=torch.float32, **kw):
    return run_backend(backend, dtype, DEVICE if backend != "torch" else DEVICE, opt_name, sam_cls=GSAM, alpha=ALPHA,
                       **kw)


def run_looksam(backend, opt_name, dtype=torch.float32, **kw):
    return run_backend(backend, dtype, DEVICE, opt_name, sam_cls=LookSAM, closure=True, k=K, alpha=LOOK_ALPHA,
                       rho_scale=LOOK_RHO, **kw)


def gv_of(opt, params):
    return [opt._gv.get(p) for p in params]


# ---------------------------------------------------------------------- the reference
@pytest.mark.parametrize("opt_name", OPTS)
def test_gsam_reference_matches_float64(opt_name):
    params, states, _ = run_gsam("torch", opt_name)
    ws, st64 = gsam64(opt_name)
    compare_fp32(params, states, ws, st64, "fp32_vs_float64")


def test_adaptive_gsam_reference_matches_float64():
    """ASAM's perturbation (T = |w| + eta) with GSAM's decomposition of the raw gradients."""
    params, states, _ = run_gsam("torch", "sgd_momentum_wd", adaptive=True, eta=0.01)
    ws, st64 = gsam64("sgd_momentum_wd", adaptive=True, eta=0.01)
    compare_fp32(params, states, ws, st64, "fp32_vs_float64")


@pytest.mark.parametrize("backend", FAST)
def test_adaptive_gsam_fast_matches_reference(backend):
    params, states, _ = run_gsam(backend, "adamw", adaptive=True, eta=0.01)
    ref, ref_states, _ = run_gsam("torch", "adamw", adaptive=True, eta=0.01)
    compare_fp32(params, states, ref, ref_states, "fast_vs_reference")


@pytest.mark.parametrize("opt_name", OPTS)
def test_looksam_reference_matches_float64(opt_name):
    params, states, opt = run_looksam("torch", opt_name)
    ws, st64, gv = looksam64(opt_name)
    compare_fp32(params, states, ws, st64, "fp32_vs_float64")
    atol, rtol = FP32["fp32_vs_float64"]
    for i, v in enumerate(gv_of(opt, params)):
        harness.assert_close(v, gv[i], atol, rtol, f"g_v of {harness.SHAPES[i]}")


def test_transcriptions_are_not_sam():
    """The combinations change the result: a test against them can fail."""
    sam, _ = harness.run_float64("sgd_momentum_wd")
    gsam, _ = gsam64("sgd_momentum_wd")
    look, _, _ = looksam64("sgd_momentum_wd")
    assert max_err(sam[2], gsam[2]) > 1e-3
    assert max_err(sam[2], look[2]) > 1e-3


# ---------------------------------------------------------------------- every fast path
@pytest.mark.quick_subset("triton", [dict(opt_name="sgd_momentum_wd")])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("opt_name", OPTS + ["sgd"])
def test_gsam_fast_matches_reference(backend, opt_name):
    params, states, _ = run_gsam(backend, opt_name)
    ref_params, ref_states, _ = run_gsam("torch", opt_name)
    compare_fp32(params, states, ref_params, ref_states, "fast_vs_reference")


@pytest.mark.quick_subset("triton", [dict(opt_name="adamw")])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("opt_name", OPTS + ["sgd"])
def test_looksam_fast_matches_reference(backend, opt_name):
    params, states, opt = run_looksam(backend, opt_name)
    ref_params, ref_states, ref = run_looksam("torch", opt_name)
    compare_fp32(params, states, ref_params, ref_states, "fast_vs_reference")
    atol, rtol = FP32["fast_vs_reference"]
    for i, (a, b) in enumerate(zip(gv_of(opt, params), gv_of(ref, ref_params))):
        harness.assert_close(a, b, atol, rtol, f"g_v of {harness.SHAPES[i]}")


@pytest.mark.quick_subset("triton", [dict(dtype=torch.bfloat16, algo="gsam"), dict(dtype=torch.float16, algo="looksam")])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algo", ["gsam", "looksam"])
def test_low_precision(backend, dtype, algo):
    """bf16 / fp16: error against float64 at most LOWP_FACTOR times the reference's in that dtype."""
    run = run_gsam if algo == "gsam" else run_looksam
    params, _, _ = run(backend, "sgd_momentum_wd", dtype)
    ref, _, _ = run("torch", "sgd_momentum_wd", dtype)
    ws = gsam64("sgd_momentum_wd", dtype=dtype)[0] if algo == "gsam" else looksam64("sgd_momentum_wd", dtype=dtype)[0]
    for i, (p, r, w) in enumerate(zip(params, ref, ws)):
        assert p.dtype == dtype and torch.isfinite(p).all()
        bound = LOWP_FACTOR * max_err(r, w) + lowp_floor(dtype, w)
        assert max_err(p, w) <= bound, f"{harness.SHAPES[i]}: {max_err(p, w):.4g} > {bound:.4g}"


@pytest.mark.parametrize("backend", FAST)
def test_generic_base_optimizer(backend):
    """A base optimizer without a fused kernel (RMSprop; its own ``alpha`` cannot be passed, GSAM's
    and LookSAM's take the name): the combination rewrites the gradients, then its own step runs.
    RMSprop's division by sqrt(square_avg) makes fp32 runs drift apart by amounts that depend on
    the CPU, so the comparison is in lock step (tests/lockstep.py): each step from the reference's
    weights and state, the perturbation and the rewritten gradients against the FP32 table, the
    update against the bound of one RMSprop step's conditioning (tolerances.py)."""
    from lockstep import run_lockstep

    assert run_lockstep(backend, GSAM, 4, alpha=ALPHA) == 4
    assert run_lockstep(backend, LookSAM, 5, k=K) == 2  # steps 0 and 3 are SAM steps


# ---------------------------------------------------------------------- exact reductions
def same(backend: str, a: torch.Tensor, b: torch.Tensor, tol: str = "fast_vs_reference") -> None:
    """Bit for bit, except for compiled Triton kernels on a GPU: there the compiler contracts
    multiply-adds into FMAs (TRITON_DEFAULT_FP_FUSION), and the kernel variant with the combination
    contracts the update differently from the one without: measured on an H200, 2.4e-7 apart after
    two steps, exactly equal with FP fusion off. There the FP32 table applies."""
    if backend == "triton" and DEVICE.type == "cuda":
        harness.assert_close(a, b, *FP32[tol], "compiled Triton")
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_gsam_alpha_zero_is_sam_bit_for_bit(backend):
    """alpha = 0: c0 = 1, c1 = -0, so the combined gradient is g_p exactly."""
    params, states, _ = run_backend(backend, torch.float32, DEVICE, "sgd_momentum_wd", sam_cls=GSAM, alpha=0.0,
                                    steps=4)
    sam, sam_states, _ = run_backend(backend, torch.float32, DEVICE, "sgd_momentum_wd", steps=4)
    for p, q in zip(params, sam):
        same(backend, p, q)


@pytest.mark.quick_subset("triton", [])  # the fused combination reduces exactly: GSAM alpha 0 shows it
@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_looksam_k1_is_sam_bit_for_bit(backend):
    params, _, _ = run_backend(backend, torch.float32, DEVICE, "adamw", sam_cls=LookSAM, closure=True, k=1, steps=4)
    sam, _, _ = run_backend(backend, torch.float32, DEVICE, "adamw", closure=True, steps=4)
    for p, q in zip(params, sam):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- state and checkpoints
@pytest.mark.quick_subset("triton", [])  # the state round trip is the backends' shared Python
@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_looksam_resumes_identically_from_a_checkpoint(backend):
    weights, coefs = problem(0)

    def make():
        params = harness.make_params(weights, torch.float32, DEVICE)
        groups = harness.groups_of(params, harness.LRS)
        return params, LookSAM(groups, torch.optim.SGD, k=K, alpha=LOOK_ALPHA, momentum=0.9, backend=backend)

    def steps(params, opt, n):
        for _ in range(n):
            for p in params:
                p.grad = None
            opt.step(lambda: harness.set_grads(params, coefs) or torch.zeros(()))

    params, opt = make()
    steps(params, opt, 4)  # mid-cycle: the next steps use the saved g_v
    saved = copy.deepcopy(opt.state_dict())
    saved_w = [p.detach().clone() for p in params]
    assert set(saved["looksam_gv"]) == set(range(len(params)))
    steps(params, opt, 4)
    params2, opt2 = make()
    with torch.no_grad():
        for p, w in zip(params2, saved_w):
            p.copy_(w)
    opt2.load_state_dict(saved)
    steps(params2, opt2, 4)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_looksam_refuses_a_checkpoint_of_other_shapes_before_loading():
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = LookSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="torch")
    state = opt.state_dict()
    state["looksam_gv"] = {0: torch.zeros(4)}
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="looksam_gv"):
        opt.load_state_dict(state)
    assert opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_looksam_failure_in_the_closure_keeps_weights_and_g_v(backend):
    """The second forward raises on a SAM step: weights restored and g_v untouched, bit for bit."""
    weights, coefs = problem(0)
    params = harness.make_params(weights, torch.float32, DEVICE)
    opt = LookSAM(harness.groups_of(params, harness.LRS), torch.optim.SGD, k=2, momentum=0.9, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = None
        opt.step(lambda: harness.set_grads(params, coefs) or torch.zeros(()))
    w0 = [p.detach().clone() for p in params]
    gv0 = [v.clone() for v in gv_of(opt, params)]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        harness.set_grads(params, coefs)
        return torch.zeros(())

    for p in params:
        p.grad = None
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert all(torch.equal(p, w) for p, w in zip(params, w0))
    assert all(torch.equal(v, w) for v, w in zip(gv_of(opt, params), gv0))


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw", [dict(alpha=-0.1), dict(alpha=float("nan")), dict(alpha=float("inf"))])
def test_bad_alpha_is_refused(kw):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="alpha"):
        GSAM(p, torch.optim.SGD, lr=0.1, **kw)
    with pytest.raises(ValueError, match="alpha"):
        LookSAM(p, torch.optim.SGD, lr=0.1, **kw)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k must"):
        LookSAM([torch.nn.Parameter(torch.randn(3))], torch.optim.SGD, lr=0.1, k=k)


def test_a_bad_group_alpha_is_refused_before_any_write():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = GSAM(params, torch.optim.SGD, lr=0.1, backend="torch")
    opt.param_groups[0]["alpha"] = -1.0
    params[0].grad = torch.ones(3)
    w0 = params[0].detach().clone()
    with pytest.raises(ValueError, match="alpha"):
        opt.first_step()
    assert torch.equal(params[0], w0)


def test_looksam_refuses_a_grad_scaler():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = LookSAM(params, torch.optim.SGD, lr=0.1, backend="torch")
    params[0].grad = torch.ones(3)
    with pytest.raises(NotImplementedError, match="GradScaler"):
        opt.first_step(grad_scaler=torch.amp.GradScaler("cpu"))
    assert opt._perturbed is None


# ---------------------------------------------------------------------- AMP, rho schedule
@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_gsam_with_a_grad_scaler_equals_the_unscaled_run(backend):
    """With a power-of-two scale every scaled gradient is exact: bit for bit the unscaled run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 8, device=DEVICE), torch.randint(0, 3, (32,), device=DEVICE)
    loss_fn = torch.nn.functional.cross_entropy
    a = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    b = GSAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    for _ in range(3):
        scaler.scale(loss_fn(model(x), y)).backward()
        a.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(a)
        scaler.update()
        a.zero_grad()
        loss_fn(twin(x), y).backward()
        b.first_step(zero_grad=True)
        loss_fn(twin(x), y).backward()
        b.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        same(backend, p, q, "amp_vs_fp32")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
def test_rho_follows_lr():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = GSAM([{"params": params, "lr": 0.1, "rho": 0.05}], torch.optim.SGD, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 - 0.25 * epoch)
    rhos = RhoFollowsLR(opt, rho_min=0.01)
    seen = []
    for _ in range(4):
        sched.step()
        seen.append(rhos.step()[0])
    # lr 0.075, 0.05, 0.025, 0: rho from 0.05 down to 0.01 in proportion
    assert seen == pytest.approx([0.04, 0.03, 0.02, 0.01])
    with pytest.raises(ValueError, match="lr_max"):
        RhoFollowsLR(opt, lr_max=0.0)


def test_gsam_and_looksam_are_not_fusedsam_by_accident():
    assert issubclass(GSAM, FusedSAM) and issubclass(LookSAM, FusedSAM)
    p = [torch.nn.Parameter(torch.randn(3))]
    assert GSAM(p, torch.optim.SGD, lr=0.1).param_groups[0]["alpha"] == 0.4
    assert LookSAM(p, torch.optim.SGD, lr=0.1).param_groups[0]["alpha"] == 0.7


def test_looksam_steps_in_between_build_their_tables_once(monkeypatch):
    """A warmed-up step in between, with gradients in place, uploads no pointer table (the update
    without a perturbation to undo reuses its buckets; it rebuilt them every step before)."""
    if "triton" not in FAST:
        pytest.skip("needs the triton backend")
    from sam_fused.kernels import table

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 70_000, 3)]
    opt = LookSAM(params, torch.optim.SGD, k=4, lr=0.01, momentum=0.9, backend="triton")
    grads = [torch.randn_like(p) for p in params]

    def closure():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        return torch.zeros(())

    for _ in range(3):  # a SAM step, then two in between: state and tables exist
        opt.step(closure)
    uploads = []
    original = table._upload
    monkeypatch.setattr(table, "_upload", lambda *a: uploads.append(a) or original(*a))
    opt.step(closure)  # step 3: in between
    assert uploads == []


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("algo", ["gsam", "looksam"])
def test_float64_parameters(backend, algo):
    """float64 stays float64 (native kernels in fp64, the reference ops elsewhere); the sums are
    fp32 values as the norm is, so the fp32 table bounds the difference."""
    run = run_gsam if algo == "gsam" else run_looksam
    params, states, _ = run(backend, "sgd_momentum_wd", torch.float64)
    ref, ref_states, _ = run("torch", "sgd_momentum_wd", torch.float64)
    assert all(p.dtype == torch.float64 for p in params)
    compare_fp32(params, states, ref, ref_states, "fast_vs_reference")


@pytest.mark.parametrize("cls", [GSAM, LookSAM])
def test_copies_and_pickles_keep_working(cls):
    import pickle

    weights, coefs = problem(0)
    params = harness.make_params(weights, torch.float32, DEVICE)
    opt = cls(harness.groups_of(params, harness.LRS), torch.optim.SGD, momentum=0.9, backend="torch")
    for _ in range(3):
        for p in params:
            p.grad = None
        opt.step(lambda: harness.set_grads(params, coefs) or torch.zeros(()))
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    if cls is LookSAM:  # g_v travels with the copy (by parameter index)
        assert set(clone.state_dict()["looksam_gv"]) == set(opt.state_dict()["looksam_gv"])
        copied = copy.deepcopy(opt)
        for i, p in enumerate(copied._indexed()):
            assert torch.equal(copied._gv.get(p), opt._gv.get(params[i]))


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_gsam_inf_in_the_second_backward_leaves_weights_and_state(backend, opt_name):
    """GradScaler: an inf in the second gradient skips the combined update (on the device for SGD,
    through the host for Adam): weights and optimizer state bit-identical, the scale halved."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)
    x, y = torch.randn(32, 8, device=DEVICE), torch.randint(0, 3, (32,), device=DEVICE)
    cls, kw = (torch.optim.SGD, dict(lr=0.1, momentum=0.9)) if opt_name == "sgd" else (torch.optim.AdamW, dict(lr=0.01))
    opt = GSAM(model.parameters(), cls, rho=0.1, backend=backend, **kw)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    loss_fn = torch.nn.functional.cross_entropy

    def step(poison: bool):
        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_fn(model(x), y)).backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step(False)  # state exists
    weights = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
             if torch.is_tensor(v)}
    step(True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = {(i, k): v for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert all(torch.equal(after[key], v) for key, v in state.items())
    assert scaler.get_scale() == 512.0
