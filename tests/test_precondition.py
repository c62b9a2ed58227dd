"""The preconditioned perturbation (``precondition=True``, FusedSAM and FunctionalSAM over Adam or
AdamW): against a float64 transcription of its rule on every CPU backend, over several steps and
two param groups with a parameter left without a gradient; ``||e|| = rho``; the first step is
SAM's; refusals leave everything as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sam_fused import FunctionalSAM, FusedSAM, GSAM, LookSAM, available_backends
from tolerances import FP32

BACKENDS = [b for b in ("torch", "cpu", "triton") if b in available_backends("cpu")]
RHO, LR, BETAS, EPS, WD = 0.05, 1e-2, (0.9, 0.99), 1e-8, 0.1
STEPS = 4


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)


def weights(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(7, 5, generator=gen) * 0.5).to(dtype), torch.zeros(7, dtype=dtype),
            (torch.randn(3, 7, generator=gen) * 0.5).to(dtype), (torch.randn(3, 4, generator=gen)).to(dtype)]


def loss_of(ws, x, y):
    w1, b1, w2, _unused = ws  # the last one takes no part: no gradient, never perturbed or updated
    return F.cross_entropy(torch.tanh(x.to(w1.dtype) @ w1.T + b1) @ w2.T, y)


def transcription(steps: int) -> list[torch.Tensor]:
    """The rule in float64: e = rho P^-1 g / ||P^-1 g||, P = sqrt(v / (1 - beta2^t)) + eps of the
    AdamW state after its last update (the identity before the first), then AdamW with the
    gradient at w + e."""
    x, y = data()
    ws = [w.double() for w in weights()]
    m = [torch.zeros_like(w) for w in ws[:3]]
    v = [torch.zeros_like(w) for w in ws[:3]]
    b1, b2 = BETAS
    for t in range(steps):
        params = [w.clone().requires_grad_() for w in ws[:3]]
        g = torch.autograd.grad(loss_of(params + [ws[3]], x, y), params)
        pg = [gi / ((vi / (1 - b2**t)).sqrt() + EPS) if t else gi for gi, vi in zip(g, v)]
        norm = torch.sqrt(sum((p**2).sum() for p in pg))
        moved = [(w + RHO * p / (norm + 1e-12)).requires_grad_() for w, p in zip(ws[:3], pg)]
        g2 = torch.autograd.grad(loss_of(moved + [ws[3]], x, y), moved)
        n = t + 1
        for i in range(3):
            w = ws[i] * (1 - LR * WD)
            m[i] = b1 * m[i] + (1 - b1) * g2[i]
            v[i] = b2 * v[i] + (1 - b2) * g2[i] ** 2
            ws[i] = w - LR / (1 - b1**n) * m[i] / ((v[i] / (1 - b2**n)).sqrt() + EPS)
    return ws


def run(backend: str, steps: int, cls=FusedSAM, **kw):
    x, y = data()
    ps = [torch.nn.Parameter(w) for w in weights()]
    groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": LR}]  # two groups, one with a parameter without grad
    opt = cls(groups, torch.optim.AdamW, rho=RHO, precondition=True, backend=backend, lr=LR, betas=BETAS, eps=EPS,
              weight_decay=WD, **kw)
    for _ in range(steps):
        opt.zero_grad()
        if cls is FunctionalSAM:
            def closure():
                w1, b1, w2, _ = ps
                out = torch.tanh(x @ w1.T + b1) @ w2.T
                return F.cross_entropy(out, y), out
        else:
            def closure():
                loss = loss_of(ps, x, y)
                loss.backward()
                return loss
        opt.step(closure)
    return ps, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_the_float64_transcription(backend):
    want = transcription(STEPS)
    got, _ = run(backend, STEPS)
    atol, rtol = FP32["fp32_vs_float64"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach().double(), w, atol=atol, rtol=rtol)


def test_the_comparison_fails_on_an_unpreconditioned_perturbation():
    """The transcription tells the preconditioned step from SAM's: the test above can fail."""
    want = transcription(STEPS)
    x, y = data()
    ps = [torch.nn.Parameter(w) for w in weights()]
    opt = FusedSAM([{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.AdamW, rho=RHO, backend="torch", lr=LR,
                   betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(STEPS):
        opt.zero_grad()
        opt.step(lambda: loss_of(ps, x, y).backward())
    atol, rtol = FP32["fp32_vs_float64"]
    with pytest.raises(AssertionError):
        for g, w in zip(ps, want):
            torch.testing.assert_close(g.detach().double(), w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_radius_is_rho_along_the_preconditioned_gradient(backend):
    ps, opt = run(backend, 2)
    x, y = data()
    opt.zero_grad()
    loss_of(ps, x, y).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in ps]
    before = [p.detach().clone() for p in ps]
    opt.first_step()
    e = [p.detach() - b for p, b in zip(ps, before)]
    assert abs(float(torch.sqrt(sum((d.double() ** 2).sum() for d in e))) - RHO) < 1e-6
    state = opt.base_optimizer.state
    for p, d, g in zip(ps, e, grads):  # e is parallel to P^-1 g, parameter by parameter
        if g is None:
            assert torch.equal(d, torch.zeros_like(d))
            continue
        st = state[p]
        pg = g / ((st["exp_avg_sq"] / (1 - BETAS[1] ** float(st["step"]))).sqrt() + EPS)
        torch.testing.assert_close(d / d.norm(), pg / pg.norm(), atol=1e-5, rtol=1e-4)
    opt.second_step()


def test_the_first_step_is_sams():
    """No second moment before the first update: the identity, so the first step equals SAM's."""
    a, _ = run("torch", 1)
    x, y = data()
    ps = [torch.nn.Parameter(w) for w in weights()]
    opt = FusedSAM([{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.AdamW, rho=RHO, backend="torch", lr=LR,
                   betas=BETAS, eps=EPS, weight_decay=WD)
    opt.step(lambda: loss_of(ps, x, y).backward())
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(a, ps))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_functional_sam_takes_the_same_perturbation(backend):
    """FunctionalSAM(precondition=True): the same perturbation as FusedSAM's; its update gradient is
    the Functional-SAM one (checked in tests/test_functional.py), so on this model (cross-entropy
    of the outputs) the two runs differ only through the second gradient's logit path."""
    ps, opt = run(backend, 2, cls=FunctionalSAM)
    qs, ref = run(backend, 2)
    x, y = data()
    opt.zero_grad()
    ref.zero_grad()
    w1, b1, w2, _ = ps
    out = torch.tanh(x @ w1.T + b1) @ w2.T
    # both from the same weights and state: copy FunctionalSAM's into FusedSAM's
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    ref.base_optimizer.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
    opt.first_step(F.cross_entropy(out, y), out)
    loss_of(qs, x, y).backward()
    ref.first_step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
    opt.restore()
    ref.restore()


@pytest.mark.parametrize("make", [
    lambda ps: FusedSAM(ps, torch.optim.SGD, precondition=True, lr=0.1),
    lambda ps: FusedSAM(ps, torch.optim.AdamW, precondition=True, adaptive=True, lr=0.1),
    lambda ps: FusedSAM(ps, torch.optim.Adam, precondition=True, amsgrad=True, lr=0.1),
    lambda ps: FusedSAM(ps, torch.optim.AdamW, precondition=1, lr=0.1),
    lambda ps: GSAM(ps, torch.optim.AdamW, precondition=True, lr=0.1),
    lambda ps: LookSAM(ps, torch.optim.AdamW, precondition=True, lr=0.1),
])
def test_refused_at_construction_with_nothing_changed(make):
    ps = [torch.nn.Parameter(w) for w in weights()]
    before = [p.detach().clone() for p in ps]
    with pytest.raises((ValueError, TypeError), match="precondition"):
        make(ps)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


def test_a_group_added_with_amsgrad_is_refused():
    ps = [torch.nn.Parameter(w) for w in weights()]
    opt = FusedSAM(ps[:2], torch.optim.Adam, precondition=True, lr=0.1)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": ps[2:], "amsgrad": True})
    assert len(opt.param_groups) == 1


def test_a_non_finite_gradient_leaves_the_weights():
    ps, opt = run("torch", 2)
    x, y = data()
    opt.zero_grad()
    loss_of(ps, x, y).backward()
    ps[0].grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in ps]
    opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    opt.restore()


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_a_resumed_run_continues_identically(backend):
    ps, opt = run(backend, 2)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in ps]
    x, y = data()
    opt.zero_grad()
    opt.step(lambda: loss_of(ps, x, y).backward())
    qs = [torch.nn.Parameter(w) for w in saved]
    fresh = FusedSAM([{"params": qs[:2]}, {"params": qs[2:], "lr": LR}], torch.optim.AdamW, rho=RHO,
                     precondition=True, backend=backend, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    fresh.load_state_dict(sd)
    fresh.step(lambda: loss_of(qs, x, y).backward())
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(ps, qs))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_the_fused_backends_take_their_launches_in_the_steady_state(monkeypatch, backend):
    """Every step's preconditioned perturbation runs in the norm and perturb launches (reading
    exp_avg_sq from the bucket's columns), not in the reference ops; the reference backend takes
    them."""
    from sam_fused.backends import reference

    calls = []
    real = reference.precondition_perturb
    monkeypatch.setattr(reference, "precondition_perturb", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(backend, STEPS)
    assert calls == []
    run("torch", 2)
    assert len(calls) == 2
