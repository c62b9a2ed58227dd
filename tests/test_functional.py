"""Functional-SAM (``FunctionalSAM``): the update gradient J(w + e)^T dL/dF(w) against a float64
transcription and against torch.autograd's Jacobian, every fast backend against the reference
over several steps, the closure and hand-written forms, accumulation, GradScaler, clipping,
checkpoints and refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sam_fused import FunctionalSAM, FusedSAM, available_backends
from tolerances import FP32

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
N_IN, N_HID, N_OUT = 5, 7, 4


def mlp(dtype=torch.float32, unused=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_OUT))
    if unused:  # a parameter the forward never reaches: no gradient
        model.register_parameter("unused", torch.nn.Parameter(torch.randn(3)))
    return model.to(device=DEVICE, dtype=dtype)


def data(i, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(n, N_IN, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype),
            torch.randint(0, N_OUT, (n,), generator=g).to(DEVICE))


def closure_of(model, x, y):
    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return closure


# ---------------------------------------------------------------------- the formula
def float64_steps(model, steps, rho, lr):
    """The paper's update written out for the 2-layer tanh MLP with plain SGD, in float64."""
    W1, b1, W2, b2 = [p.detach().double().clone() for p in model.parameters()]
    for i in range(steps):
        x, y = data(i, torch.float64)
        x = x.cpu()
        n = x.shape[0]

        def forward(W1, b1, W2, b2):
            h = torch.tanh(x @ W1.T + b1)
            return h, h @ W2.T + b2

        def vjp(W1, b1, W2, b2, v):  # J(w)^T v by hand
            h, _ = forward(W1, b1, W2, b2)
            dW2, db2 = v.T @ h, v.sum(0)
            dpre = (v @ W2) * (1 - h * h)
            return dpre.T @ x, dpre.sum(0), dW2, db2

        _, logits = forward(W1, b1, W2, b2)
        v = (torch.softmax(logits, 1) - F.one_hot(y.cpu(), N_OUT).double()) / n  # dL/dF at w
        g = vjp(W1, b1, W2, b2, v)
        norm = math.sqrt(sum(float((t * t).sum()) for t in g))
        moved = [w + rho * t / (norm + 1e-12) for w, t in zip((W1, b1, W2, b2), g)]
        gF = vjp(*moved, v)  # the Jacobian at w + e, the loss derivative at w
        W1, b1, W2, b2 = [w - lr * t for w, t in zip((W1, b1, W2, b2), gF)]
    return [W1, b1, W2, b2]


def test_reference_matches_the_float64_transcription():
    model = mlp(torch.float64)
    want = float64_steps(copy.deepcopy(model), 4, rho=0.3, lr=0.5)
    opt = FunctionalSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.5, backend="torch")
    for i in range(4):
        opt.step(closure_of(model, *data(i, torch.float64)))
    for p, w in zip(model.parameters(), want):  # the norm is an fp32 sum (tolerances.FP64_FLOOR)
        torch.testing.assert_close(p.detach().cpu(), w, atol=1e-8, rtol=1e-6)


def test_update_gradient_is_the_jacobian_at_w_plus_e_times_the_saved_output_gradient():
    """Against torch.autograd's full Jacobian of the outputs at w + e (SGD with lr 1: the step is
    the update gradient), in float64; and it is not SAM's gradient (the logit path is gone)."""
    model = mlp(torch.float64)
    x, y = data(0, torch.float64)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params])

    def outputs(w):
        ws, k = [], 0
        for s in shapes:
            ws.append(w[k:k + math.prod(s)].view(s))
            k += math.prod(s)
        W1, b1, W2, b2 = ws
        return (torch.tanh(x @ W1.T + b1) @ W2.T + b2).flatten()

    logits = outputs(flat).view(-1, N_OUT)
    v = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0] if logits.requires_grad else None
    f = flat.clone().requires_grad_(True)
    lg = outputs(f).view(-1, N_OUT)
    v = torch.autograd.grad(F.cross_entropy(lg, y), lg, retain_graph=True)[0]
    g = torch.autograd.grad(lg, f, v)[0]
    e = 0.3 * g / (g.norm() + 1e-12)
    J = torch.autograd.functional.jacobian(outputs, flat + e)  # [outputs, params]
    want = J.T @ v.flatten()
    sam_grad = torch.autograd.functional.jacobian(lambda w: F.cross_entropy(outputs(w).view(-1, N_OUT), y), flat + e)

    opt = FunctionalSAM(params, torch.optim.SGD, rho=0.3, lr=1.0, backend="torch")
    opt.step(closure_of(model, x, y))
    got = flat - torch.cat([p.detach().flatten() for p in params])
    # the global norm is an fp32 sum for every dtype (tolerances.FP64_FLOOR): e is fp32-accurate
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-6)
    assert float((got - sam_grad).abs().max()) > 1e-6  # the logit path SAM keeps and Functional-SAM drops


def test_a_linear_network_is_a_plain_step():
    """With outputs linear in w the Jacobian does not move: Functional-SAM's gradient is the one at w."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(N_IN, N_OUT).double()
    plain = copy.deepcopy(lin)
    x, y = data(0, torch.float64)
    FunctionalSAM(lin.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, backend="torch").step(closure_of(lin, x, y))
    F.cross_entropy(plain(x), y).backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    for a, b in zip(lin.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-12)


# ---------------------------------------------------------------------- every backend
def run(backend, form="closure", steps=5, base=torch.optim.AdamW, **kw):
    model = mlp(unused=True)
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.01}, {"params": params[2:], "lr": 0.02, "rho": 0.2}]
    opt = FunctionalSAM(groups, base, rho=0.1, backend=backend, **kw)
    for i in range(steps):
        x, y = data(i)
        if form == "closure":
            opt.step(closure_of(model, x, y))
            continue
        logits = model(x)
        opt.first_step(F.cross_entropy(logits, y), logits)
        opt.second_step(model(x))
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.SGD])
def test_fast_backends_match_the_reference(backend, base):
    kw = dict(momentum=0.9) if base is torch.optim.SGD else {}
    fast, fopt = run(backend, base=base, **kw)
    ref, ropt = run("torch", base=base, **kw)
    atol, rtol = FP32["fast_vs_reference"]
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=name)
    assert fast.unused.grad is None and torch.equal(fast.unused, ref.unused)
    for p, q in zip(fast.parameters(), ref.parameters()):
        for k, v in fopt.state[p].items():
            torch.testing.assert_close(v, ropt.state[q][k], atol=atol, rtol=rtol)


def test_hand_written_form_equals_the_closure_form():
    a, _ = run("torch", "closure")
    b, _ = run("torch", "hand")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_accumulation_equals_the_whole_batch():
    whole, parts = mlp(), mlp()
    o1 = FunctionalSAM(whole.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, backend="torch")
    o2 = FunctionalSAM(parts.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, backend="torch")
    x, y = data(0, n=16)
    o1.step(closure_of(whole, x, y))
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    for xb, yb in halves:
        logits = parts(xb)
        o2.accumulate(F.cross_entropy(logits, yb) / 2, logits)
    o2.first_step()
    for xb, _ in halves:
        o2.second_backward(parts(xb))
    o2.second_step()
    for p, q in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_grad_scaler_with_a_power_of_two_scale_equals_the_unscaled_run():
    plain, scaled = mlp(), mlp()
    o1 = FunctionalSAM(plain.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, momentum=0.9, backend="torch")
    o2 = FunctionalSAM(scaled.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, momentum=0.9, backend="torch")
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    for i in range(3):
        x, y = data(i)
        o1.step(closure_of(plain, x, y))
        o2.zero_grad()
        logits = scaled(x)
        o2.first_step(scaler.scale(F.cross_entropy(logits, y)), logits, grad_scaler=scaler)
        o2.second_backward(scaled(x))
        scaler.step(o2)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), scaled.parameters()))


def test_max_grad_norm_clips_the_update_gradient():
    a, b = mlp(torch.float64), mlp(torch.float64)
    x, y = data(0, torch.float64)
    FunctionalSAM(a.parameters(), torch.optim.SGD, rho=0.3, lr=1.0, max_grad_norm=0.01,
                  backend="torch").step(closure_of(a, x, y))
    ob = FunctionalSAM(b.parameters(), torch.optim.SGD, rho=0.3, lr=1.0, backend="torch")
    logits = b(x)
    ob.first_step(F.cross_entropy(logits, y), logits)
    ob.second_backward(b(x))
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.01)
    ob.second_step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-14, rtol=1e-12)
    moved = math.sqrt(sum(float(((p - q) ** 2).sum()) for p, q in zip(a.parameters(), mlp(torch.float64).parameters())))
    assert moved == pytest.approx(0.01, rel=1e-3)  # clip_grad_norm_ divides by norm + 1e-6


def test_checkpoint_resumes_bit_for_bit():
    model, opt = run("torch", steps=2)
    sd = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(model)
    p2 = list(m2.parameters())
    o2 = FunctionalSAM([{"params": p2[:2], "lr": 0.01}, {"params": p2[2:], "lr": 0.02, "rho": 0.2}],
                       torch.optim.AdamW, rho=0.1, backend="torch")
    o2.load_state_dict(sd)
    for i in range(2, 4):
        x, y = data(i)
        opt.step(closure_of(model, x, y))
        o2.step(closure_of(m2, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_bf16_autocast_trains():
    model = mlp()
    opt = FunctionalSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.02, backend="torch")
    x, y = data(0, n=64)
    losses = []
    for _ in range(15):
        def closure():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                logits = model(x)
            return F.cross_entropy(logits.float(), y), logits
        losses.append(float(opt.step(closure).detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_leave_the_weights_bit_identical(backend):
    model = mlp()
    opt = FunctionalSAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01, backend=backend)
    x, y = data(0)
    opt.step(closure_of(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())

    def unchanged():
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert str(opt.state_dict()["state"]) == str(state["state"])

    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))  # a bare loss
    unchanged()
    with pytest.raises(ValueError, match="requires grad"):
        opt.step(lambda: (F.cross_entropy(model(x), y), model(x).detach()))
    unchanged()
    calls = []

    def changing_shape():  # the second call (at w + e) sees other inputs
        calls.append(1)
        logits = model(x if len(calls) == 1 else x[:4])
        return F.cross_entropy(logits, y[:logits.shape[0]]), logits

    with pytest.raises(ValueError, match="same inputs"):
        opt.step(changing_shape)
    unchanged()
    with pytest.raises(RuntimeError, match="no output gradient"):
        opt.first_step()
    unchanged()
    logits = model(x)
    opt.first_step(F.cross_entropy(logits, y), logits)
    with pytest.raises(RuntimeError, match="micro-batches"):
        opt.second_step()  # the second pass did not run
    opt.restore()
    unchanged()
