"""Momentum-SAM: the reference against a float64 transcription of the authors' code (one group, as
they support) and of the rules as documented (two groups with their own rho and lr, a missing
gradient at step 3, Adam's L2 decay), every fast backend against the reference over several steps
(harness.py's odd shapes and layouts, fp32 and the low-precision rule), ``unperturbed()``,
``restore()``, checkpoints and copies, GradScaler and the refusals; a rho changed between steps
(each perturbation undone with the rho that made it), checkpoints taken inside ``unperturbed()``,
``add_param_group`` with torch's keys only, and the bound on rho.

Tolerances: tests/tolerances.py (the FP32 table, the low-precision rule).
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import harness
from harness import GROUP_OF, RHOS, active_at, grad_fn, lrs_of, make_params, max_err, problem, set_grads
from sam_fused import MSAM, available_backends
from tolerances import FP32, LOWP_FACTOR, lowp_floor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
FAST = [b for b in BACKENDS if b != "torch"]
OPTS = ["sgd_momentum_wd", "adam", "adamw"]
STEPS = 7


def run(backend, dtype, opt_name, steps=STEPS, rho_scale=1.0, missing_step=harness.NO_GRAD_STEP):
    """``steps`` MSAM steps on harness.py's problem; returns (params, per-param states, optimizer)."""
    weights, coefs = problem(0)
    params = make_params(weights, dtype, DEVICE)
    cls, kw = harness.OPTIMIZERS[opt_name]
    groups = harness.groups_of(params, lrs_of(opt_name), rhos=tuple(r * rho_scale for r in RHOS))
    opt = MSAM(groups, cls, backend=backend, **kw)
    for step in range(steps):
        set_grads(params, coefs, {harness.NO_GRAD_PARAM} if step == missing_step else set())
        opt.step()
    return params, [opt.state[p] for p in params], opt


_CACHE: dict = {}


def cached(backend, dtype, opt_name):
    key = (backend, dtype, opt_name)
    if key not in _CACHE:
        _CACHE[key] = run(backend, dtype, opt_name)
    return _CACHE[key]


# ---------------------------------------------------------------------- float64 transcriptions
def msam64(opt_name, steps=STEPS, dtype=torch.float32, missing_step=harness.NO_GRAD_STEP, rho_at=None):
    """The rules of backends/reference.py (MSAM_RULES) in float64: returns (stored weights, true weights, states).
    ``rho_at(step, group)``: the groups' rho at each step (default RHOS); a perturbation is undone
    with the rho that made it."""
    weights, coefs = problem(0)
    ws = [w.to(dtype).double().clone() for w in weights]
    cls, kw = harness.OPTIMIZERS[opt_name]
    lrs = lrs_of(opt_name)
    wd = kw.get("weight_decay", 0.0)
    state = [dict() for _ in ws]
    inv, perturbed = 0.0, set()
    applied = [0.0] * len(ws)  # the rho of each parameter's perturbation
    for step in range(steps):
        rho = [RHOS[GROUP_OF[i]] if rho_at is None else rho_at(step, GROUP_OF[i]) for i in range(len(ws))]
        active = [i for i in range(len(ws)) if not (step == missing_step and i == harness.NO_GRAD_PARAM)]
        g = {i: grad_fn(ws[i], coefs[i]) for i in active}
        key = "momentum_buffer" if cls is torch.optim.SGD else "exp_avg"
        for i in perturbed - set(active):  # put back, not updated
            ws[i] = ws[i] + applied[i] * inv * state[i][key]
        for i in active:
            st, w, lr = state[i], ws[i], lrs[GROUP_OF[i]]
            d = g[i] + (0.0 if cls is torch.optim.AdamW else wd) * w
            if i in perturbed:
                w = w + applied[i] * inv * st[key]
            if cls is torch.optim.SGD:
                st["momentum_buffer"] = kw["momentum"] * st.get("momentum_buffer", torch.zeros_like(w)) + d
                w = w - lr * st["momentum_buffer"]
            else:
                beta1, beta2 = kw.get("betas", (0.9, 0.999))
                if not st:
                    st.update(step=0.0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
                st["step"] += 1
                st["exp_avg"] = beta1 * st["exp_avg"] + (1 - beta1) * d
                st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * d * d
                bc1, bc2 = 1 - beta1 ** st["step"], 1 - beta2 ** st["step"]
                w = w - (lr / bc1) * st["exp_avg"] / (st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + kw["eps"])
                if cls is torch.optim.AdamW:
                    w = w * (1 - lr * wd)
            ws[i] = w
        inv = 1.0 / (math.sqrt(sum(float((state[i][key] ** 2).sum()) for i in active)) + 1e-12)
        true = list(ws)
        for i in active:
            ws[i] = ws[i] - rho[i] * inv * state[i][key]
            applied[i] = rho[i]
        perturbed = set(active)
    return ws, true, state


def authors64(opt_name, weights, grads_at, steps, lr, rho, kw):
    """The authors' optimizer/msam.py and optimizer/adamW_msam.py, transcribed line by line in
    float64 (one param group, every parameter with a gradient: what they support)."""
    ps = [w.double().clone() for w in weights]
    if opt_name == "sgd_momentum_wd":
        bufs = [torch.zeros_like(p) for p in ps]
        inverse_norm_buffer = 0
        for _ in range(steps):
            d_ps = grads_at(ps)
            for param, d_p, buf in zip(ps, d_ps, bufs):
                d_p.add_(param, alpha=kw["weight_decay"])
                param.add_(buf, alpha=rho * inverse_norm_buffer)
                buf.mul_(kw["momentum"]).add_(d_p)
                param.add_(buf, alpha=-lr)
            inverse_norm_buffer = 1 / (torch.norm(torch.stack([b.norm(p=2) for b in bufs]), p=2) + 1e-12)
            for param, buf in zip(ps, bufs):
                param.sub_(buf, alpha=rho * float(inverse_norm_buffer))
        return ps
    beta1, beta2 = kw["betas"]
    exp_avgs = [torch.zeros_like(p) for p in ps]
    exp_avg_sqs = [torch.zeros_like(p) for p in ps]
    norm_factor = 0.0
    for step in range(1, steps + 1):
        grads = grads_at(ps)
        for param, grad, exp_avg, exp_avg_sq in zip(ps, grads, exp_avgs, exp_avg_sqs):
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            param.add_(exp_avg, alpha=norm_factor)
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(kw["eps"])
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            param.mul_(1 - lr * kw["weight_decay"])
        ascent_norm = torch.norm(torch.stack([b.norm(p=2) for b in exp_avgs]), p=2)
        norm_factor = float(1 / (ascent_norm + 1e-12) * rho)
        for param, exp_avg in zip(ps, exp_avgs):
            param.sub_(exp_avg, alpha=norm_factor)
    return ps


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
def test_reference_matches_the_authors_code(opt_name):
    """One group, every gradient present, the authors' own lines in float64 against MSAM."""
    weights, coefs = problem(0)
    keep = [0, 1, 2, 5]  # 1, 97, 278011 elements and the transposed view
    weights = [weights[i].float().double() for i in keep]
    coefs = [coefs[i] for i in keep]
    cls, kw = harness.OPTIMIZERS[opt_name]
    lr, rho = lrs_of(opt_name)[0], RHOS[0]
    want = authors64(opt_name, weights, lambda ps: [grad_fn(p, c) for p, c in zip(ps, coefs)], STEPS, lr, rho, kw)
    params = [torch.nn.Parameter(w.float().clone()) for w in weights]
    opt = MSAM(params, cls, rho=rho, lr=lr, backend="torch", **kw)
    for _ in range(STEPS):
        for p, c in zip(params, coefs):
            p.grad = grad_fn(p.detach().double(), c).float()
        opt.step()
    atol, rtol = FP32["fp32_vs_float64"]
    for p, w in zip(params, want):
        harness.assert_close(p, w, atol, rtol, "weights")


@pytest.mark.parametrize("opt_name", OPTS)
def test_reference_matches_float64(opt_name):
    """Two groups (their own rho and lr), a missing gradient at step 3, every layout."""
    params, states, _ = cached("torch", torch.float32, opt_name)
    ws, _, st64 = msam64(opt_name)
    atol, rtol = FP32["fp32_vs_float64"]
    for i, (p, w) in enumerate(zip(params, ws)):
        harness.assert_close(p, w, atol, rtol, f"param {harness.SHAPES[i]}")
    for s, s64 in zip(states, st64):
        for k, v in s.items():
            if k != "step":
                harness.assert_close(v, s64[k], atol, rtol, k)


def test_missing_gradient_rule_is_tested():
    """The float64 transcription with and without the missing gradient differ (the rule is seen)."""
    a, _, _ = msam64("sgd_momentum_wd")
    b, _, _ = msam64("sgd_momentum_wd", missing_step=-1)
    assert max_err(a[harness.NO_GRAD_PARAM], b[harness.NO_GRAD_PARAM]) > 1e-3


@pytest.mark.quick_subset("triton", [dict(opt_name="sgd_momentum_wd"), dict(opt_name="adamw")])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("opt_name", OPTS)
def test_fast_matches_reference_fp32(backend, opt_name):
    params, states, _ = cached(backend, torch.float32, opt_name)
    ref, ref_states, _ = cached("torch", torch.float32, opt_name)
    atol, rtol = FP32["fast_vs_reference"]
    for i, (p, r) in enumerate(zip(params, ref)):
        harness.assert_close(p, r, atol, rtol, f"param {harness.SHAPES[i]}")
    for s, r in zip(states, ref_states):
        assert set(s) == set(r)
        for k, v in s.items():
            if k == "step":
                assert float(v) == float(r[k])
            else:
                harness.assert_close(v, r[k], atol, rtol, k)


# interpreted Triton in low precision only in `make test-full` (7 s a case): the fp32 cases run
# both kernel kinds, and its bf16 rounding is the shared to_dtype of every Triton family
@pytest.mark.quick_subset("triton", [])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_low_precision(backend, dtype, opt_name):
    """Error of the fast path vs float64 <= 2x the error of the reference run in the same dtype."""
    params, states, _ = cached(backend, dtype, opt_name)
    ref, ref_states, _ = cached("torch", dtype, opt_name)
    ws, _, st64 = msam64(opt_name, dtype=dtype)
    for i, (p, r, w) in enumerate(zip(params, ref, ws)):
        assert p.dtype == dtype and torch.isfinite(p).all()
        bound = LOWP_FACTOR * max_err(r, w) + lowp_floor(dtype, w)
        assert max_err(p, w) <= bound, f"param {harness.SHAPES[i]}: {max_err(p, w):.4g} > {bound:.4g}"
    for s, r, s64 in zip(states, ref_states, st64):
        for k, v in s.items():
            if k == "step":
                continue
            bound = LOWP_FACTOR * max_err(r[k], s64[k]) + lowp_floor(dtype, s64[k])
            assert max_err(v, s64[k]) <= bound, f"state {k}: {max_err(v, s64[k]):.4g} > {bound:.4g}"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native CPU kernels unavailable")
def test_float64_parameters_on_the_native_kernels():
    params, _, _ = run("cpu", torch.float64, "adamw")
    ref, _, _ = run("torch", torch.float64, "adamw")
    for p, r in zip(params, ref):
        harness.assert_close(p, r, 1e-12, 1e-12, "fp64")


def test_tolerance_catches_a_1_percent_error():
    params, _, _ = run("torch", torch.float32, "sgd_momentum_wd", rho_scale=1.01)
    ws, _, _ = msam64("sgd_momentum_wd")
    atol, rtol = FP32["fp32_vs_float64"]
    with pytest.raises(AssertionError):
        harness.assert_close(params[2], ws[2], atol, rtol, "278011")


# ---------------------------------------------------------------------- the weights between steps
def _bits(tensors):
    return [t.detach().clone() for t in tensors]


def _state_bits(opt):
    return [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unperturbed_gives_the_true_weights_and_puts_them_back_bit_identically(backend):
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=4)
    _, true, _ = msam64("sgd_momentum_wd", steps=4)
    before = _bits(params)
    atol, rtol = FP32["fp32_vs_float64"]
    with opt.unperturbed():
        for i, (p, w) in enumerate(zip(params, true)):
            harness.assert_close(p, w, atol, rtol, f"true weights {harness.SHAPES[i]}")
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.step()
        with pytest.raises(RuntimeError, match="already active"):
            with opt.unperturbed():
                pass
    assert _equal(_bits(params), before)
    # a block that writes: the weights are perturbed again from what it wrote
    with opt.unperturbed():
        inside = _bits(params)
        with torch.no_grad():
            params[2].add_(1.0)
    m = opt.state[params[2]]["momentum_buffer"]
    expected = (inside[2] + 1.0) - (opt._inv * RHOS[0]) * m
    assert torch.equal(params[2].detach(), expected)
    assert _equal(_bits(params[3:]), before[3:])


@pytest.mark.quick_subset("triton", [])
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_ends_training_at_the_true_weights(backend):
    params, _, opt = run(backend, torch.float32, "adamw", steps=4)
    _, true, _ = msam64("adamw", steps=4)
    assert opt.restore()
    atol, rtol = FP32["fp32_vs_float64"]
    for p, w in zip(params, true):
        harness.assert_close(p, w, atol, rtol, "restored")
    assert not opt.restore()
    # the next step starts from there: no second restore
    _, coefs = problem(0)
    set_grads(params, coefs)
    snapshot = _bits(params)
    opt.step()
    with opt.unperturbed():
        moved = [max_err(p, s) for p, s in zip(params, snapshot)]
    assert max(moved) < 0.05  # one AdamW step of lr <= 0.01, not the restore of a perturbation of ~0.1


# ---------------------------------------------------------------------- checkpoints and copies
def _resume(backend, opt_name, cut, total):
    """``total`` steps straight, and ``cut`` steps + a checkpoint (model and optimizer, through
    torch.save) loaded into new parameters and a new optimizer + the rest: both runs' weights and
    state."""
    _, coefs = problem(0)
    params, _, opt = run(backend, torch.float32, opt_name, steps=cut)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    weights, _ = problem(0)
    fresh = make_params(weights, torch.float32, DEVICE)
    with torch.no_grad():
        for p, saved in zip(fresh, ckpt["params"]):
            p.copy_(saved)
    cls, kw = harness.OPTIMIZERS[opt_name]
    opt2 = MSAM(harness.groups_of(fresh, lrs_of(opt_name)), cls, backend=backend, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(cut, total):
        set_grads(fresh, coefs, {harness.NO_GRAD_PARAM} if step == harness.NO_GRAD_STEP else set())
        opt2.step()
    straight, _, opt_s = run(backend, torch.float32, opt_name, steps=total)
    return (_bits(fresh), _state_bits(opt2), float(opt2._inv)), (_bits(straight), _state_bits(opt_s), float(opt_s._inv))


@pytest.mark.quick_subset("triton", [dict(opt_name="sgd_momentum_wd", cut=4)])
@pytest.mark.parametrize("cut", [2, 4])  # 4: the step before had a missing gradient
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_resumes_bit_identically(backend, opt_name, cut):
    resumed, straight = _resume(backend, opt_name, cut, 6)
    assert _equal(resumed[0], straight[0])
    assert _equal(resumed[1], straight[1])
    assert resumed[2] == straight[2]


@pytest.mark.quick_subset("triton", [])
@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_continue_identically(backend):
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=3)
    _, coefs = problem(0)
    twin_params, twin_opt = copy.deepcopy((params, opt))
    pickled_params, pickled_opt = pickle.loads(pickle.dumps((params, opt)))
    for ps, o in ((params, opt), (twin_params, twin_opt), (pickled_params, pickled_opt)):
        for _ in range(2):
            set_grads(ps, coefs)
            o.step()
    # a copy of the strided slice is contiguous (torch's deepcopy), so the kernels take it where the
    # original took the reference ops: the same math, rounded by another compiler (FMA)
    dense = [i for i, s in enumerate(harness.SHAPES) if s != "strided"]
    for copied in (twin_params, pickled_params):
        assert _equal([copied[i].detach() for i in dense], [params[i].detach() for i in dense])
        atol, rtol = FP32["fast_vs_reference"]
        harness.assert_close(copied[-1], params[-1], atol, rtol, "strided")


# ---------------------------------------------------------------------- AMP
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler(backend, opt_name):
    """scaler.step(opt): with a power-of-two scale the run equals the unscaled one bit for bit; an
    inf leaves weights, momentum and the norm as they were, and lowers the scale."""
    kw = dict(sgd=(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
              adamw=(torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)))[opt_name]

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(DEVICE)
        return model, MSAM(model.parameters(), kw[0], rho=0.5, backend=backend, **kw[1])

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 7, generator=gen).to(DEVICE), torch.randint(0, 3, (32,), generator=gen).to(DEVICE))
            for _ in range(3)]
    plain, opt = setup()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    model, opt = setup()
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if k == 1:  # one poisoned step in the middle: skipped
            before = _bits(model.parameters()) + _state_bits(opt) + [opt._inv.clone()]
            model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            assert _equal(_bits(model.parameters()) + _state_bits(opt) + [opt._inv.clone()], before)
            assert scaler.get_scale() == 2.0**9
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert _equal(_bits(model.parameters()), _bits(plain.parameters()))


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cls, kw, match", [
    (torch.optim.SGD, dict(lr=0.1), "momentum must be > 0"),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), "no Nesterov"),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1), "no dampening"),
    (torch.optim.Adam, dict(lr=0.1, amsgrad=True), "amsgrad"),
    (torch.optim.AdamW, dict(lr=0.1, maximize=True), "maximize"),
    (torch.optim.RMSprop, dict(lr=0.1), "SGD, torch.optim.Adam or torch.optim.AdamW"),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=float("nan")), "rho"),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=-1.0), "rho"),
])
def test_refused_configurations(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MSAM([torch.nn.Parameter(torch.ones(3))], cls, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_steps_change_nothing(backend):
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=2)
    _, coefs = problem(0)
    before = _bits(params) + _state_bits(opt) + [opt._inv.clone()]
    sd_before = opt.state_dict()

    def unchanged():
        assert _equal(_bits(params) + _state_bits(opt) + [opt._inv.clone()], before)

    set_grads(params, coefs)
    opt.param_groups[1]["rho"] = float("nan")
    with pytest.raises(ValueError, match="rho"):
        opt.step()
    unchanged()
    opt.param_groups[1]["rho"] = RHOS[1]
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    unchanged()
    opt.param_groups[0]["momentum"] = 0.9
    params[2].grad = torch.zeros(params[2].shape).to_sparse()  # a sparse gradient
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    unchanged()
    set_grads(params, coefs)
    opt.state[params[1]]["momentum_buffer"] = torch.zeros(3)  # a state of another parameter
    with pytest.raises(RuntimeError, match="does not fit"):
        opt.step()
    opt.state[params[1]]["momentum_buffer"] = before[len(params) + 1].clone()
    unchanged()
    bad = copy.deepcopy(sd_before)
    bad["param_groups"][0]["msam_perturbed"] = [99]
    with pytest.raises(ValueError, match="out of range"):
        opt.load_state_dict(bad)
    plain = copy.deepcopy(sd_before)
    for g in plain["param_groups"]:
        del g["msam_perturbed"]
    with pytest.raises(ValueError, match="no Momentum-SAM entries"):
        opt.load_state_dict(plain)
    unchanged()
    opt.step()  # and the optimizer still works
    assert not _equal(_bits(params), before[: len(params)])


def test_step_with_closure_calls_it_once():
    model = torch.nn.Linear(4, 2)
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=1.0, lr=0.1, momentum=0.9, backend="torch")
    calls = []
    x = torch.randn(8, 4)

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_reuses_the_plan(backend):
    """After the first steps, the perturbed set is the plan's: no per-step comparison of sets."""
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=2)
    plan = opt._fast_plan
    _, coefs = problem(0)
    set_grads(params, coefs)
    opt.step()
    assert opt._fast_plan is plan and plan is not None
    assert len(opt._backend.backups) == 0  # no parameter-sized buffer besides the base optimizer's state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_gradient_does_not_reach_every_weight(backend):
    """Without AMP a NaN gradient makes the base update NaN where it is (as SGD's would); the norm
    is then NaN, and Momentum-SAM perturbs nothing (inv 0) rather than every weight by NaN; the
    next steps restore nothing and go on."""
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=2)
    _, coefs = problem(0)
    set_grads(params, coefs)
    params[1].grad[3] = float("nan")
    opt.step()
    assert float(opt._inv) == 0.0
    assert not torch.isfinite(params[1]).all()
    for i, p in enumerate(params):
        if i != 1:
            assert torch.isfinite(p).all(), harness.SHAPES[i]


# ---------------------------------------------------------------------- rho changed between steps
SCHEDULE = (1.0, 1.0, 0.5, 1.5, 0.25, 2.0, 1.0, 0.75)  # rho's factor at each of 8 steps


def _scheduled(step, group):
    return RHOS[group] * SCHEDULE[step]


@pytest.mark.quick_subset("triton", [dict(opt_name="sgd_momentum_wd")])
@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_rho_matches_float64(backend, opt_name):
    """rho set before every step (as RhoFollowsLR does): each perturbation is undone with the
    radius that made it, by the step, by unperturbed() and by restore(), also after an edit that
    no step has used yet; a missing gradient at step 3 (put back with the old radius)."""
    weights, coefs = problem(0)
    params = make_params(weights, torch.float32, DEVICE)
    cls, kw = harness.OPTIMIZERS[opt_name]
    opt = MSAM(harness.groups_of(params, lrs_of(opt_name)), cls, backend=backend, **kw)
    for step in range(len(SCHEDULE)):
        for k, group in enumerate(opt.param_groups):
            group["rho"] = _scheduled(step, k)
        set_grads(params, coefs, {harness.NO_GRAD_PARAM} if step == harness.NO_GRAD_STEP else set())
        opt.step()
    ws, true, _ = msam64(opt_name, steps=len(SCHEDULE), rho_at=_scheduled)
    atol, rtol = FP32["fp32_vs_float64"]
    for i, (p, w) in enumerate(zip(params, ws)):
        harness.assert_close(p, w, atol, rtol, f"param {harness.SHAPES[i]}")
    for group in opt.param_groups:  # not used by any step yet: the true weights stay where they are
        group["rho"] = 1.0
    with opt.unperturbed():
        for i, (p, w) in enumerate(zip(params, true)):
            harness.assert_close(p, w, atol, rtol, f"unperturbed {harness.SHAPES[i]}")
    assert opt.restore()
    for i, (p, w) in enumerate(zip(params, true)):
        harness.assert_close(p, w, atol, rtol, f"restored {harness.SHAPES[i]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edited_rho_leaves_the_true_weights_where_they_are(backend):
    """rho 3 -> 1 between steps: unperturbed() gives the weights of the same run without the edit,
    bit for bit; the next step undoes the radius-3 perturbation and makes a radius-1 one."""
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=4, rho_scale=3.0 / RHOS[0])
    twin, _, twin_opt = run(backend, torch.float32, "sgd_momentum_wd", steps=4, rho_scale=3.0 / RHOS[0])
    stored = _bits(params)
    for group in opt.param_groups:
        group["rho"] = 1.0
    with opt.unperturbed(), twin_opt.unperturbed():
        assert _equal(_bits(params), _bits(twin))
    assert _equal(_bits(params), stored)
    _, coefs = problem(0)
    set_grads(params, coefs)
    opt.step()
    old = tuple(r * 3.0 / RHOS[0] for r in RHOS)
    ws, true, _ = msam64("sgd_momentum_wd", steps=5, rho_at=lambda step, g: 1.0 if step == 4 else old[g])
    atol, rtol = FP32["fp32_vs_float64"]
    for i, (p, w) in enumerate(zip(params, ws)):
        harness.assert_close(p, w, atol, rtol, f"param {harness.SHAPES[i]}")
    for group in opt.param_groups:
        group["rho"] = 2.0
    assert opt.restore()
    for i, (p, w) in enumerate(zip(params, true)):
        harness.assert_close(p, w, atol, rtol, f"restored {harness.SHAPES[i]}")


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _loaded(backend, opt_name, saved_params, saved_opt):
    weights, _ = problem(0)
    fresh = make_params(weights, torch.float32, DEVICE)
    with torch.no_grad():
        for p, saved in zip(fresh, saved_params):
            p.copy_(saved)
    cls, kw = harness.OPTIMIZERS[opt_name]
    opt = MSAM(harness.groups_of(fresh, lrs_of(opt_name)), cls, backend=backend, **kw)
    opt.load_state_dict(saved_opt)
    return fresh, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_carry_the_radius_of_the_perturbation(backend):
    """The state dict names the rho each group's perturbation was made with: a resumed optimizer
    whose rho is edited before its first step still undoes the saved perturbation exactly. A
    checkpoint without that entry (older ones) takes the group's rho, as it was written for, and
    resumes bit for bit."""
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=4)
    ckpt = _roundtrip({"params": _bits(params), "opt": opt.state_dict()})
    assert [g["msam_rho"] for g in ckpt["opt"]["param_groups"]] == list(RHOS)
    fresh, opt2 = _loaded(backend, "sgd_momentum_wd", ckpt["params"], ckpt["opt"])
    assert all("msam_rho" not in g for g in opt2.param_groups)
    for group in opt2.param_groups:
        group["rho"] = 1.0
    with opt.unperturbed(), opt2.unperturbed():
        assert _equal(_bits(fresh), _bits(params))
    assert _equal(_bits(fresh), ckpt["params"])
    # the older format
    old = copy.deepcopy(ckpt["opt"])
    for g in old["param_groups"]:
        del g["msam_rho"]
    fresh, opt3 = _loaded(backend, "sgd_momentum_wd", ckpt["params"], old)
    _, coefs = problem(0)
    for ps, o in ((params, opt), (fresh, opt3)):
        for _ in range(2):
            set_grads(ps, coefs)
            o.step()
    assert _equal(_bits(fresh), _bits(params))
    assert _equal(_state_bits(opt3), _state_bits(opt))
    bad = copy.deepcopy(ckpt["opt"])
    before = _bits(fresh) + _state_bits(opt3) + [opt3._inv.clone()]
    for value in (float("nan"), -1.0, 1e6, "3"):
        bad["param_groups"][1]["msam_rho"] = value
        with pytest.raises(ValueError, match="msam_rho"):
            opt3.load_state_dict(bad)
        assert _equal(_bits(fresh) + _state_bits(opt3) + [opt3._inv.clone()], before)


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_taken_inside_unperturbed_resumes_from_the_true_weights(backend, opt_name):
    """Inside unperturbed() the model holds w, and the state dict says so (nothing perturbed): a
    resume from that checkpoint is the run that restore() would have made at that point, bit for
    bit; the saving optimizer itself goes on as if nothing had been saved."""
    params, _, opt = run(backend, torch.float32, opt_name, steps=4)
    twin, _, twin_opt = run(backend, torch.float32, opt_name, steps=4)
    with opt.unperturbed():
        ckpt = _roundtrip({"params": _bits(params), "opt": opt.state_dict()})
    assert all(g["msam_perturbed"] == [] for g in ckpt["opt"]["param_groups"])
    fresh, opt2 = _loaded(backend, opt_name, ckpt["params"], ckpt["opt"])
    assert twin_opt.restore()
    assert _equal(_bits(fresh), _bits(twin))
    _, coefs = problem(0)
    for _ in range(3):
        for ps, o in ((fresh, opt2), (twin, twin_opt), (params, opt)):
            set_grads(ps, coefs)
            o.step()
    assert _equal(_bits(fresh), _bits(twin))
    assert _equal(_state_bits(opt2), _state_bits(twin_opt))
    straight, _, opt_s = run(backend, torch.float32, opt_name, steps=7)
    assert _equal(_bits(params), _bits(straight))


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_with_only_params_and_lr(backend, opt_name):
    """A group added with the keys a torch user passes gets the defaults, as at construction."""
    weights, coefs = problem(0)
    cls, kw = harness.OPTIMIZERS[opt_name]
    lrs = lrs_of(opt_name)
    a = make_params(weights, torch.float32, DEVICE)
    b = make_params(weights, torch.float32, DEVICE)
    opt_a = MSAM([{"params": a[:4]}, {"params": a[4:], "lr": lrs[1]}], cls, rho=RHOS[0], lr=lrs[0],
                 backend=backend, **kw)
    opt_b = MSAM([{"params": b[:4]}], cls, rho=RHOS[0], lr=lrs[0], backend=backend, **kw)
    opt_b.add_param_group({"params": b[4:], "lr": lrs[1]})
    assert {k: v for k, v in opt_b.param_groups[1].items() if k != "params"} == \
        {k: v for k, v in opt_a.param_groups[1].items() if k != "params"}
    for _ in range(3):
        for ps, o in ((a, opt_a), (b, opt_b)):
            set_grads(ps, coefs)
            o.step()
    assert _equal(_bits(a), _bits(b))
    assert _equal(_state_bits(opt_a), _state_bits(opt_b))


# ---------------------------------------------------------------------- the bound on rho
def test_a_radius_beyond_the_bound_is_refused():
    p = [torch.nn.Parameter(torch.ones(3))]
    for rho in (1e6, 1e30, MSAM.MAX_RHO * 1.5):
        with pytest.raises(ValueError, match=f"rho.*{MSAM.MAX_RHO:g}"):
            MSAM(p, torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)
    opt = MSAM(p, torch.optim.SGD, rho=MSAM.MAX_RHO, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"rho.*{MSAM.MAX_RHO:g}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "rho": 1e6})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_radius_changes_nothing(backend):
    """A step with a group's rho beyond the bound raises before any write; unperturbed() meanwhile
    still undoes the perturbation with the radius that made it."""
    params, _, opt = run(backend, torch.float32, "sgd_momentum_wd", steps=2)
    _, coefs = problem(0)
    before = _bits(params) + _state_bits(opt) + [opt._inv.clone()]
    sd_before = opt.state_dict()
    set_grads(params, coefs)
    opt.param_groups[0]["rho"] = 1e6
    with pytest.raises(ValueError, match=f"rho.*{MSAM.MAX_RHO:g}"):
        opt.step()
    assert _equal(_bits(params) + _state_bits(opt) + [opt._inv.clone()], before)
    sd = opt.state_dict()
    assert [(g["msam_rho"], g["msam_perturbed"], g["msam_inverse_norm"]) for g in sd["param_groups"]] == \
        [(g["msam_rho"], g["msam_perturbed"], g["msam_inverse_norm"]) for g in sd_before["param_groups"]]
    _, true, _ = msam64("sgd_momentum_wd", steps=2)
    atol, rtol = FP32["fp32_vs_float64"]
    with opt.unperturbed():
        for i, (p, w) in enumerate(zip(params, true)):
            harness.assert_close(p, w, atol, rtol, f"unperturbed {harness.SHAPES[i]}")
    assert _equal(_bits(params), before[: len(params)])
    opt.param_groups[0]["rho"] = RHOS[0]
    opt.step()
    ws, _, _ = msam64("sgd_momentum_wd", steps=3)
    for i, (p, w) in enumerate(zip(params, ws)):
        harness.assert_close(p, w, atol, rtol, f"param {harness.SHAPES[i]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_amp_step_keeps_the_radius_of_the_perturbation(backend):
    """rho edited on a step that GradScaler skips (an inf): the weights keep the old perturbation,
    and the radius recorded for it stays the old one."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(DEVICE)
        return model, MSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, backend=backend)

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 7, generator=gen).to(DEVICE), torch.randint(0, 3, (32,), generator=gen).to(DEVICE)
    runs = [setup(), setup()]
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) for _ in runs]
    for k in range(4):
        for j, ((model, opt), scaler) in enumerate(zip(runs, scalers)):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if k == 3:  # skipped in both runs; the rho edited in one
                model[0].weight.grad[0, 0] = float("inf")
                if j == 0:
                    opt.param_groups[0]["rho"] = 2.0
            scaler.step(opt)
            scaler.update()
    (m0, o0), (m1, o1) = runs
    with o0.unperturbed(), o1.unperturbed():
        assert _equal(_bits(m0.parameters()), _bits(m1.parameters()))
