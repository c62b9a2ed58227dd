"""What a failure or an odd input must not do, on every backend that runs here: a refused or
failed step leaves weights, state and the schedule as if it had never been called; a layer
unfrozen later is seen by ``step(closure)``; a non-finite first gradient poisons nothing (GSAM,
LookSAM); Frob/Trace/Det-SAM refuse what FusedSAM refuses; the norm is finite whenever it fits
fp32; a first step with no gradient says so.

Small problems throughout (a few dozen elements): the Triton kernels run interpreted on the CPU.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from harness import assert_close
from sam_fused import GSAM, DetSAM, FrobSAM, FusedSAM, LookSAM, TraceSAM, available_backends
from tolerances import FP32

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def make_params(seed=0, sizes=(5, 7), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device=DEVICE, dtype=dtype)) for n in sizes]


def gradient(p: torch.Tensor) -> torch.Tensor:
    """The gradient of ``loss_of``: different at w and at w + e."""
    w = p.detach()
    return w + 0.5 * torch.cos(w) + 0.1


def loss_of(p: torch.Tensor) -> torch.Tensor:
    return (0.5 * p * p + 0.5 * torch.sin(p) + 0.1 * p).sum()


class Closure:
    """Forward and backward of ``loss_of`` over the trainable parameters, counting calls; the
    calls numbered (from 1) in ``fail_on`` raise instead, those in ``nan_on`` give one NaN gradient."""

    def __init__(self, params, fail_on=(), nan_on=()):
        self.params, self.calls, self.fail_on, self.nan_on = params, 0, set(fail_on), set(nan_on)

    def __call__(self):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("out of memory (simulated)")
        loss = sum(loss_of(p) for p in self.params if p.requires_grad)
        if self.calls in self.nan_on:
            loss = loss + self.params[1][3] * float("nan")
        loss.backward()
        return loss.detach()


def snapshot(opt, params):
    sd = opt.state_dict()
    return ([p.detach().clone() for p in params],
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in _flat(sd).items()})


def _flat(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def assert_same(a, b):
    wa, sa = a
    wb, sb = b
    assert all(torch.equal(x, y) for x, y in zip(wa, wb)), "weights changed"
    assert sa.keys() == sb.keys(), f"state keys changed: {sorted(set(sa) ^ set(sb))}"
    for k in sa:
        x, y = sa[k], sb[k]
        same = torch.equal(x, y) if torch.is_tensor(x) else (x == y or (x != x and y != y))
        assert same, f"state {k} changed: {x!r} -> {y!r}"


OPTIMIZERS = {
    "sam": lambda ps, b: FusedSAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=b),
    "interval": lambda ps, b: FusedSAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=b, interval=2),
    "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, rho=0.1, alpha=0.4, lr=0.1, momentum=0.9, backend=b),
    "looksam": lambda ps, b: LookSAM(ps, torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=0.1, momentum=0.9, backend=b),
}


# ---------------------------------------------------------------------- 1. unfrozen layers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(OPTIMIZERS))
def test_a_layer_unfrozen_later_is_seen_by_the_backward_watch(backend, algo):
    """Layer b frozen at the first step(closure), then a frozen and b unfrozen: a backward that
    reaches only b before step(closure) must count as the backward (the closure called once more
    per SAM step, never twice for a plain step), and the result must equal the same steps by hand."""
    runs = []
    for by_hand in (False, True):
        a, b = make_params()
        b.requires_grad_(False)
        opt = OPTIMIZERS[algo]([a, b], backend)
        closure = Closure([a, b])
        opt.zero_grad()
        opt.step(closure)  # step 0 (a SAM step for every algorithm here), nothing before it
        a.requires_grad_(False)
        b.requires_grad_(True)
        opt.zero_grad()
        for step in (1, 2):
            closure()  # the user's backward: reaches only b
            before = closure.calls
            if by_hand:
                if opt.is_sam_step(step):
                    opt.first_step(zero_grad=True)
                    closure()
                    opt.second_step()
                else:
                    opt._plain_step()  # what step(closure) does on a plain step, with these gradients
                for group in opt.param_groups:
                    group["sam_step"] = step + 1
            else:
                opt.step(closure)
            runs.append((by_hand, step, closure.calls - before))
            opt.zero_grad()
        runs.append((by_hand, [p.detach().clone() for p in (a, b)]))
    calls = [r for r in runs if len(r) == 3 and not r[0]]
    expected = [(False, s, 1 if OPTIMIZERS[algo]([torch.nn.Parameter(torch.ones(1))], "torch").is_sam_step(s) else 0)
                for s in (1, 2)]
    assert calls == expected
    auto, hand = runs[2][1], runs[5][1]
    assert all(torch.equal(x, y) for x, y in zip(auto, hand))


# ---------------------------------------------------------------------- 2. the schedule
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["interval", "looksam"])
@pytest.mark.parametrize("bad", [("rho", float("nan")), ("rho", -1.0), ("alpha", float("nan"))])
def test_a_refused_step_changes_nothing_and_the_retry_is_the_step_that_was_due(backend, algo, bad):
    key, value = bad
    if key == "alpha" and algo != "looksam":
        pytest.skip("alpha is LookSAM's")
    params = make_params()
    opt = OPTIMIZERS[algo](params, backend)
    for step in range(2):  # steps 0 (SAM) and 1 (plain): the next one, 2, is a SAM step
        opt.zero_grad()
        opt.step(Closure(params))
    opt.zero_grad()
    before = snapshot(opt, params)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step(Closure(params))
    opt.param_groups[0][key] = good
    assert_same(before, snapshot(opt, params))
    closure = Closure(params)
    opt.step(closure)
    assert closure.calls == 2, "the retry must be the SAM step that was due"
    assert opt.param_groups[0]["sam_step"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(OPTIMIZERS))
@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_failed_closure_leaves_weights_state_and_schedule(backend, algo, fail_on):
    """A closure that raises (an out-of-memory a loop catches to skip the batch), on the first or
    the second call of a SAM step: everything as before, and the next call is that SAM step."""
    params = make_params()
    opt = OPTIMIZERS[algo](params, backend)
    for _ in range(2):
        opt.zero_grad()
        opt.step(Closure(params))
    opt.zero_grad()
    before = snapshot(opt, params)
    gv = [v.clone() for v in opt._gv.values()] if algo == "looksam" else []
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(Closure(params, fail_on={fail_on}))
    assert_same(before, snapshot(opt, params))
    if gv:
        assert all(torch.equal(x, y) for x, y in zip(opt._gv.values(), gv))
    opt.zero_grad()
    closure = Closure(params)
    opt.step(closure)
    assert closure.calls == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_plain_step_does_not_shift_the_schedule(backend):
    params = make_params()
    opt = OPTIMIZERS["interval"](params, backend)
    opt.zero_grad()
    opt.step(Closure(params))  # step 0: SAM
    opt.zero_grad()
    with pytest.raises(RuntimeError):
        opt.step(Closure(params, fail_on={1}))  # step 1 (plain) fails
    assert opt.param_groups[0]["sam_step"] == 1
    calls = []
    for _ in range(2):  # step 1 (plain, one call), step 2 (SAM, two calls)
        opt.zero_grad()
        closure = Closure(params)
        opt.step(closure)
        calls.append(closure.calls)
    assert calls == [1, 2]


# ---------------------------------------------------------------------- 3. a non-finite first gradient
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sam", "gsam", "looksam"])
def test_a_nan_first_gradient_poisons_nothing(backend, algo):
    """The first gradient has a NaN (no scaler): the perturbation is skipped, the saved gradient
    and g_v keep their values, and the update is the base step with the second gradient, as
    FusedSAM's; nothing becomes NaN, then or in the steps after."""
    params = make_params()
    opt = OPTIMIZERS[algo](params, backend)
    for _ in range(4):  # the next step, 4, is a SAM step for LookSAM too (k = 2)
        opt.zero_grad()
        opt.step(Closure(params))
    w0 = [p.detach().clone() for p in params]
    m0 = [opt.state[p]["momentum_buffer"].clone() for p in params]
    saved = [v.clone() for v in opt._save.values()] if algo != "sam" else []
    gv = [v.clone() for v in opt._gv.values()] if algo == "looksam" else []

    opt.zero_grad()
    closure = Closure(params, nan_on={1})  # the first forward and backward give a NaN
    opt.step(closure)
    assert closure.calls == 2
    atol, rtol = FP32["fast_vs_reference"]
    for i, (p, w, m) in enumerate(zip(params, w0, m0)):  # SGD with momentum 0.9, lr 0.1, g at w
        assert torch.isfinite(p).all()
        assert_close(p, w - 0.1 * (0.9 * m + gradient(w)), atol, rtol,
                     f"param {i}: the update must be the base step with the second gradient")
    if saved:
        assert all(torch.equal(x, y) for x, y in zip(opt._save.values(), saved)), "the saved gradient changed"
    if gv:
        assert all(torch.equal(x, y) for x, y in zip(opt._gv.values(), gv)), "g_v changed"
    for _ in range(3):
        opt.zero_grad()
        opt.step(Closure(params))
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------- 4. the universal class
@pytest.mark.parametrize("cls", [FrobSAM, TraceSAM, DetSAM])
@pytest.mark.parametrize("rho", [float("inf"), 1e31, float("nan"), 0.0, -1.0])
def test_universal_class_refuses_what_fusedsam_refuses(cls, rho):
    params = make_params()
    with pytest.raises(ValueError, match="rho"):
        cls(params, torch.optim.SGD, rho=rho, lr=0.1)
    opt = cls(params, torch.optim.SGD, lr=0.1, seed=0)
    opt.param_groups[0]["rho"] = rho
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="rho"):
        opt.step(Closure(params))
    assert_same(before, snapshot(opt, params))


# ---------------------------------------------------------------------- 5. the norm's range
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, magnitude", [(torch.bfloat16, 1e20), (torch.float32, 1e30), (torch.float32, 1e-25)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_norm_is_finite_whenever_it_fits_fp32(backend, dtype, magnitude, adaptive):
    """bf16 gradients of 1e20 have a norm of 6.9e20 (fits fp32) but a sum of squares of 4.8e41
    (does not): the norm must be right and the perturbation made. Gradients of 1e-25 have squares
    that underflow fp32: their norm must not come out 0."""
    if dtype not in _dtypes(backend):
        pytest.skip(f"{backend} does not take {dtype}")
    params = [torch.nn.Parameter(torch.ones(48, dtype=dtype, device=DEVICE))]
    opt = FusedSAM(params, torch.optim.SGD, rho=1.0, lr=0.1, adaptive=adaptive, backend=backend)
    params[0].grad = torch.full((48,), magnitude, dtype=dtype, device=DEVICE)
    g = float(params[0].grad[0])
    expected = math.sqrt(48) * g  # T = |w| = 1 for ASAM too
    opt.first_step()
    norm = float(opt.grad_norm)
    assert math.isfinite(norm) and abs(norm - expected) <= 1e-6 * expected
    e = 1.0 * g / (expected + 1e-12)  # rho * T^2 * g / (||T g|| + eps), T = 1
    want = float(torch.tensor(1 + e, dtype=torch.float64).to(dtype))
    assert torch.allclose(params[0].detach().double(), torch.full((48,), want, dtype=torch.float64),
                          rtol=0, atol=2 * torch.finfo(dtype).eps)
    opt.second_step()


def _dtypes(backend):
    opt = FusedSAM([torch.nn.Parameter(torch.ones(1, device=DEVICE))], torch.optim.SGD, lr=0.1, backend=backend)
    return opt._backend.dtypes or (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------- 6. no gradient at all
@pytest.mark.parametrize("algo", ["sam", "gsam"])
def test_first_step_without_any_gradient_warns_once(algo):
    params = make_params()
    opt = OPTIMIZERS[algo](params, "torch")
    for p in params:
        p.grad = gradient(p)
    opt.zero_grad()  # the mistake: gradients gone before first_step
    with pytest.warns(UserWarning, match="found no gradient"):
        opt.first_step()
    opt.second_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.first_step()
        opt.second_step()
