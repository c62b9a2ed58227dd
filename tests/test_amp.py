"""Mixed precision with torch.amp.GradScaler: ``first_step(grad_scaler=scaler)`` then
``scaler.step(opt)``. Both gradient sets are unscaled inside the kernels; an inf or NaN in either
pass leaves weights and state bit-identical and lowers the scale; every unsupported combination
raises before anything is written (or, after the perturbation, with the weights restored)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam_fused import FusedSAM, available_backends
from tolerances import FP32, LOWP_FACTOR, lowp_floor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)),
}


def setup(backend: str, opt_name: str, adaptive: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(DEVICE)
    cls, kw = OPTIMIZERS[opt_name]
    opt = FusedSAM(model.parameters(), cls, rho=0.05, adaptive=adaptive, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 7, generator=gen).to(DEVICE), torch.randint(0, 3, (32,), generator=gen).to(DEVICE))
            for _ in range(4)]
    return model, opt, data


def snapshot(model, opt):
    state = [t.clone() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()] + state


def fp32_step(model, opt, x, y, clip=None):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step()


def amp_step(model, opt, scaler, x, y, poison=None, clip=None):
    """One SAM step with the scaler; ``poison`` = 1 or 2 writes an inf/NaN into that pass's grads."""
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison == 1:
        model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison == 2:
        model[2].bias.grad[1] = float("nan")
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()


def assert_close(got, want, tol):
    atol, rtol = tol
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("init_scale", [2.0**10, 1000.0])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_run_equals_unscaled_run(backend, opt_name, init_scale):
    ref_model, ref_opt, data = setup(backend, opt_name, adaptive=opt_name == "adamw")
    model, opt, _ = setup(backend, opt_name, adaptive=opt_name == "adamw")
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=init_scale)
    norms = []
    for x, y in data[:3]:
        fp32_step(ref_model, ref_opt, x, y)
        norms.append(ref_opt.grad_norm.clone())
        amp_step(model, opt, scaler, x, y)
        # grad_norm is the norm of the unscaled gradients
        torch.testing.assert_close(opt.grad_norm.reshape(()), norms[-1].reshape(()), atol=0, rtol=FP32["amp_vs_fp32"][1])
    assert scaler.get_scale() == init_scale
    assert_close(snapshot(model, opt), snapshot(ref_model, ref_opt), FP32["amp_vs_fp32"])
    if init_scale == 2.0**10:  # scaling by a power of two is exact
        assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), snapshot(ref_model, ref_opt)))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter computing with the NaN
@pytest.mark.parametrize("poison", [1, 2])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_either_pass_skips_the_step_and_lowers_the_scale(backend, opt_name, poison):
    model, opt, data = setup(backend, opt_name)
    ref_model, ref_opt, _ = setup(backend, opt_name)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    for x, y in data[:2]:
        amp_step(model, opt, scaler, x, y)
        fp32_step(ref_model, ref_opt, x, y)
    before = snapshot(model, opt)
    amp_step(model, opt, scaler, *data[2], poison=poison)
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "a skipped step wrote something"
    assert scaler.get_scale() == 2.0**9
    if opt_name == "adamw":  # the step count did not move either
        assert all(float(st["step"]) == 2 for st in opt.state.values())
    # the next step is a normal one, at the lowered scale
    amp_step(model, opt, scaler, *data[3])
    fp32_step(ref_model, ref_opt, *data[3])
    assert_close(snapshot(model, opt), snapshot(ref_model, ref_opt), FP32["amp_vs_fp32"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_the_second_gradient(backend):
    """scaler.unscale_(opt) after the second backward, clip, scaler.step(opt): as clipping in fp32."""
    ref_model, ref_opt, data = setup(backend, "sgd")
    model, opt, _ = setup(backend, "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    for x, y in data[:3]:
        fp32_step(ref_model, ref_opt, x, y, clip=0.05)
        amp_step(model, opt, scaler, x, y, clip=0.05)
    assert_close(snapshot(model, opt), snapshot(ref_model, ref_opt), FP32["amp_vs_fp32"])


def test_disabled_scaler_is_a_plain_step():
    ref_model, ref_opt, data = setup("torch", "sgd")
    model, opt, _ = setup("torch", "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=False)
    for x, y in data[:2]:
        fp32_step(ref_model, ref_opt, x, y)
        amp_step(model, opt, scaler, x, y)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), snapshot(ref_model, ref_opt)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_float16_with_scaler(backend):
    """fp16 autocast, the documented loop: against the fp32 run, the scaled run's error is within
    the flash-attention rule of the same autocast loop's error without a scaler (a scale applied to
    the update instead of removed would be 4096x off)."""
    def run(enabled):
        model, opt, data = setup(backend, "sgd")
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12, enabled=enabled)
        for x, y in data[:3]:
            opt.zero_grad()
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == (2.0**12 if enabled else 1.0)
        return snapshot(model, opt)

    ref_model, ref_opt, data = setup(backend, "sgd")
    initial = snapshot(ref_model, ref_opt)
    for x, y in data[:3]:
        fp32_step(ref_model, ref_opt, x, y)
    ref = snapshot(ref_model, ref_opt)
    scaled, plain = run(True), run(False)
    for s_, p_, r, w0 in zip(scaled, plain, ref, initial):
        err_scaled, err_plain = (s_ - r).abs().max(), (p_ - r).abs().max()
        assert err_scaled <= LOWP_FACTOR * err_plain + lowp_floor(torch.float16, r)
    assert not torch.equal(scaled[0], initial[0])


# ---------------------------------------------------------------------------- refusals
def _scaled_first_backward(model, scaler, x, y):
    scaler.scale(F.cross_entropy(model(x), y)).backward()


def test_scaler_step_with_a_closure_is_refused():
    model, opt, data = setup("torch", "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type)
    _scaled_first_backward(model, scaler, *data[0])
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="not supported"):
        scaler.step(opt, lambda: None)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))


def test_scaler_step_without_a_scaled_first_step_restores_and_raises():
    model, opt, data = setup("torch", "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type)
    _scaled_first_backward(model, scaler, *data[0])
    before = snapshot(model, opt)
    opt.first_step(zero_grad=True)  # no grad_scaler: the scaled gradients were read as they are
    _scaled_first_backward(model, scaler, *data[0])
    with pytest.raises(RuntimeError, match="without grad_scaler"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))
    with pytest.raises(RuntimeError, match="first_step"):  # nothing left perturbed
        scaler.step(opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_second_step_after_a_scaled_first_step_is_refused(backend):
    model, opt, data = setup(backend, "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type)
    _scaled_first_backward(model, scaler, *data[0])
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    perturbed = snapshot(model, opt)
    _scaled_first_backward(model, scaler, *data[0])
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), perturbed))
    scaler.step(opt)  # the right call still works
    scaler.update()


def test_unscale_before_first_step_is_refused_with_nothing_written():
    model, opt, data = setup("torch", "sgd")
    scaler = torch.amp.GradScaler(DEVICE.type)
    _scaled_first_backward(model, scaler, *data[0])
    scaler.unscale_(opt)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(grad_scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))


def test_first_step_refuses_a_scaler_that_scaled_nothing():
    model, opt, data = setup("torch", "sgd")
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    with pytest.raises(RuntimeError, match="scaler.scale"):
        opt.first_step(grad_scaler=torch.amp.GradScaler(DEVICE.type))
    with pytest.raises(TypeError, match="GradScaler"):
        opt.first_step(grad_scaler=object())
