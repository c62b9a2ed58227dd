"""Frob-SAM, Trace-SAM, Det-SAM: exact formulas against float64 with explicit noise, the kernels'
noise statistics, and the optimizer contract (checkpoints, bad input, exact restore)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import HAS_TRITON
from sam_fused import BackendUnavailable, DetSAM, FrobSAM, TraceSAM, UniversalSAM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
CLASSES = {"frob": FrobSAM, "trace": TraceSAM, "det": DetSAM}
# rho and lam for the formula tests: large enough that the sharpness term moves the weights by
# 1e-3 to 2e-2 over 3 steps (asserted: > 100 ATOL), so a wrong formula cannot pass.
TEST_HYPER = {"frob": dict(rho=0.1, lam=0.2), "trace": dict(rho=0.2, lam=2.0),
              "det": dict(rho=1.0, lam=0.5, h=0.2)}
# fp32 implementation vs the float64 transcription, 3 steps of a 47-parameter MLP: measured at
# most 6e-8 (fp32 rounding of weights, losses and gradients; the centred sums keep the Frob-SAM
# bracket from cancelling). 1e-6 leaves a 15x margin.
ATOL = 1e-6


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DEVICE)
    x = torch.randn(16, 3, device=DEVICE)
    y = torch.randint(0, 2, (16,), device=DEVICE)
    return model, x, y


def explicit_noise(measure, h):
    """Standardized draws keyed by (step, sample, parameter): Gaussian, or uniform in [-h, h]."""

    def noise(step, sample, params):
        out = []
        for j, p in enumerate(params):
            gen = torch.Generator().manual_seed(1000 * step + 10 * sample + j)
            if measure == "det":
                out.append((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * h)
            else:
                out.append(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        return out

    return noise


def float64_run(measure, n, steps, hyper, lr=0.1):
    """The paper's update rules, transcribed in float64 (raw sums, no centring), plain SGD."""
    model, x, y = tiny()
    model = copy.deepcopy(model).double()
    xd = x.double()
    noise = explicit_noise(measure, hyper.get("h", 0.01))
    rho, lam = hyper["rho"], hyper["lam"]
    params = list(model.parameters())

    def loss_grad():
        model.zero_grad()
        loss = F.cross_entropy(model(xd), y)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in params]

    for step in range(steps):
        w = [p.detach().clone() for p in params]
        l0, g0 = loss_grad()
        ls, gs = [], []
        for i in range(n):
            z = noise(step, i, params)
            with torch.no_grad():
                for p, wi, zi in zip(params, w, z):
                    p.copy_(wi + rho * zi.to(p))
            li, gi = loss_grad()
            ls.append(li)
            gs.append(gi)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        g = []
        for k in range(len(params)):
            if measure == "frob":
                s_lg = sum(ls[i] * gs[i][k] for i in range(n))
                s_g = sum(gs[i][k] for i in range(n))
                g.append(g0[k] + lam / rho**2 / (n - 1) * (s_lg - sum(ls) / n * s_g))
            else:
                d = [(li - l0) / rho**2 for li in ls]
                if measure == "trace":
                    psi_p, phi_p = [1.0] * n, 1.0
                else:
                    psi = [math.exp(-di / 2) for di in d]
                    psi_p = [-v / 2 for v in psi]
                    phi_p = -2.0 / (sum(psi) / n) ** 3
                g.append(g0[k] + lam * phi_p * sum(psi_p[i] / n * (gs[i][k] - g0[k]) for i in range(n)))
        with torch.no_grad():
            for p, gk in zip(params, g):
                p.sub_(lr * gk)
    return [p.detach() for p in params]


def run(cls_measure, backend, n, steps, hyper, lr=0.1, explicit=True):
    model, x, y = tiny()
    kw = dict(hyper)
    opt = CLASSES[cls_measure](model.parameters(), torch.optim.SGD, lr=lr, n_samples=n, backend=backend,
                               noise=explicit_noise(cls_measure, kw.get("h", 0.01)) if explicit else None, seed=7,
                               **kw)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)
    return [p.detach() for p in model.parameters()], opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("measure", list(CLASSES))
def test_exact_formulas_against_float64(measure, n, backend):
    hyper = TEST_HYPER[measure]
    got, _ = run(measure, backend, n, 3, hyper)
    want = float64_run(measure, n, 3, hyper)
    plain = float64_run(measure, n, 3, dict(hyper, lam=0.0))  # the same without the sharpness term
    for a, b, c in zip(got, want, plain):
        err = (a.double().cpu() - b.cpu()).abs().max().item()
        assert err <= ATOL, f"{measure} n={n} {backend}: {err:.3g}"
    effect = max((b.cpu() - c.cpu()).abs().max().item() for b, c in zip(want, plain))
    assert effect > 100 * ATOL, f"the sharpness term must be visible to this test ({effect:.3g})"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("measure", list(CLASSES))
def test_triton_equals_torch_given_the_same_noise(measure):
    hyper = TEST_HYPER[measure]
    a, _ = run(measure, "triton", 2, 4, hyper)
    b, _ = run(measure, "torch", 2, 4, hyper)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def _perturbations(measure, backend, steps=2, n=4, rho=1.0, h=0.5):
    """(step, sample) -> (w_perturbed - w) / rho, recorded inside the closure, generated noise."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(20000, device=DEVICE))
    seen = {}
    cls = CLASSES[measure]
    kw = dict(h=h) if measure == "det" else {}
    opt = cls([p], torch.optim.SGD, lr=0.0, lam=0.0, rho=rho, n_samples=n, backend=backend, seed=3, **kw)
    w0 = p.detach().clone()
    calls = []

    def closure():
        calls.append((p.detach() - w0).cpu() / rho)
        loss = (p * p).mean() * 0.5
        loss.backward()
        return loss

    for step in range(steps):
        calls.clear()
        opt.zero_grad()
        opt.step(closure)
        for i, z in enumerate(calls[1:]):
            seen[(step, i)] = z
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure", ["frob", "det"])
def test_generated_noise_has_the_right_distribution(measure, backend):
    """Mean, variance and range of the drawn noise, fresh for every sample and step (20000 draws:
    the standard error of a sample mean is 0.007 of a standard deviation; bounds are 5 of them)."""
    h = 0.5
    seen = _perturbations(measure, backend, h=h)
    draws = list(seen.values())
    for z in draws:
        m, v = z.mean().item(), z.var().item()
        if measure == "det":
            assert z.abs().max().item() <= h + 1e-6
            sd = h / math.sqrt(3)
            assert abs(m) < 5 * sd / math.sqrt(z.numel()) and abs(v - sd * sd) < 0.05 * sd * sd
        else:
            assert abs(m) < 5 / math.sqrt(z.numel()) and abs(v - 1) < 0.05
    flat = torch.stack(draws)
    corr = torch.corrcoef(flat)
    off = corr - torch.eye(len(draws))
    assert off.abs().max().item() < 5 / math.sqrt(flat.shape[1]), "samples and steps must draw fresh noise"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure", list(CLASSES))
def test_weights_restored_exactly_when_nothing_updates(measure, backend):
    model, x, y = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = CLASSES[measure](model.parameters(), torch.optim.SGD, lr=0.0, backend=backend)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_draws_the_same_noise(backend):
    model, x, y = tiny()

    def closure_for(m):
        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss

        return closure

    opt = FrobSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=5, backend=backend)
    for _ in range(2):
        opt.zero_grad()
        opt.step(closure_for(model))
    sd = copy.deepcopy(opt.state_dict())
    assert all(g["usam_step"] == 2 for g in sd["param_groups"])
    model2 = copy.deepcopy(model)
    opt2 = FrobSAM(model2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=5, backend=backend)
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(2):
            o.zero_grad()
            o.step(closure_for(m))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(measure="frob", n_samples=1), "n_samples"),
        (dict(measure="trace", n_samples=0), "n_samples"),
        (dict(measure="nope"), "measure"),
        (dict(measure="frob", lam=-1.0), "lam"),
        (dict(measure="frob", rho=0.0), "rho"),
        (dict(measure="det", h=-0.1), "h"),
        (dict(measure="frob", backend="nope"), "unknown backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):
        UniversalSAM([p], torch.optim.SGD, lr=0.1, **kwargs)


def test_native_backends_are_refused_clearly():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(BackendUnavailable, match="torch' and 'triton"):
        FrobSAM([p], torch.optim.SGD, lr=0.1, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_leaves_everything_untouched(backend):
    model, x, y = tiny()
    opt = TraceSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    opt.param_groups[0]["lam"] = -1.0

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="lam"):
        opt.step(closure)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure", list(CLASSES))
def test_extra_buffers_are_as_documented(measure, backend):
    from sam_fused.backends.universal_reference import extra_buffers

    model, x, y = tiny()
    opt = CLASSES[measure](model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    be = opt._backend
    for p in model.parameters():
        held = 1 + len(be.buffers[p])  # the backup, then g0 and the sums
        assert held == extra_buffers(measure)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("measure", list(CLASSES))
def test_triton_equals_torch_on_a_large_tensor(measure):
    """70,000 elements: a full chunk, full blocks and a masked tail in the kernels."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(70_000, generator=gen).to(DEVICE)
    a = (0.5 + torch.rand(70_000, generator=gen)).to(DEVICE)
    hyper = TEST_HYPER[measure]
    results = []
    for backend, lam in (("torch", hyper["lam"]), ("triton", hyper["lam"]), ("torch", 0.0)):
        p = nn.Parameter(w0.clone())
        opt = CLASSES[measure]([p], torch.optim.SGD, lr=0.1, n_samples=2, backend=backend,
                               noise=explicit_noise(measure, hyper.get("h", 0.01)), **dict(hyper, lam=lam))

        def closure():
            loss = (0.5 * a * p * p + 0.1 * torch.sin(3 * p)).sum() / 100  # per-element gradients ~0.01
            loss.backward()
            return loss

        for _ in range(3):
            opt.zero_grad()
            opt.step(closure)
        results.append(p.detach())
    assert torch.allclose(results[0], results[1], atol=1e-6, rtol=1e-5)
    effect = (results[0] - results[2]).abs().max().item()
    assert effect > 1e-4, f"the sharpness term must be visible to this test ({effect:.3g})"
