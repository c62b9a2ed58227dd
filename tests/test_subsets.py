"""Perturbing a subset (SAM-ON): a param group with ``perturb=False`` stays where it is and out of
the norm; every backend against a float64 transcription over several steps (odd shapes and
layouts, a missing gradient), and ``norm_layer_param_groups``."""

from __future__ import annotations

import math

import pytest
import torch

import harness
from harness import NO_GRAD_PARAM, NO_GRAD_STEP, assert_close, base_update, grad_fn, make_params, problem, set_grads
from sam_fused import GSAM, FusedSAM, LookSAM, available_backends, norm_layer_param_groups
from tolerances import FP32

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
OPT = "sgd_momentum_wd"
SPLIT = 3  # parameters 0-2 perturbed (group 0), 3-6 not (group 1): the 278011 one is perturbed


def groups(params, perturb_second=False, rho_second=40.0):
    lrs = harness.lrs_of(OPT)
    return [{"params": params[:SPLIT], "lr": lrs[0], "rho": 20.0},
            {"params": params[SPLIT:], "lr": lrs[1], "rho": rho_second, "perturb": perturb_second}]


def run(backend, steps=5, dtype=torch.float32):
    weights, coefs = problem(0)
    params = make_params(weights, dtype, DEVICE)
    cls, kw = harness.OPTIMIZERS[OPT]
    opt = FusedSAM(groups(params), cls, backend=backend, **kw)
    moved = []
    for step in range(steps):
        missing = {NO_GRAD_PARAM} if step == NO_GRAD_STEP else set()
        set_grads(params, coefs, missing)
        opt.first_step(zero_grad=True)
        # the perturb pass (and the restore) read and write the perturbed parameters alone
        assert {id(p) for p in opt._perturbed.active} == {id(p) for i, p in enumerate(params[:SPLIT]) if i not in missing}
        moved.append([p.detach().clone() for p in params])
        set_grads(params, coefs, missing)
        opt.second_step(zero_grad=True)
    return params, opt, moved


def run_float64(steps=5):
    weights, coefs = problem(0)
    ws = [w.to(torch.float32).double().clone() for w in weights]
    lrs = harness.lrs_of(OPT)
    state = [dict() for _ in ws]
    moved_all = []
    for step in range(steps):
        active = harness.active_at(step)
        g0 = {i: grad_fn(ws[i], coefs[i]) for i in active}
        norm = math.sqrt(sum(float((g0[i] ** 2).sum()) for i in active if i < SPLIT))  # the perturbed ones only
        moved = [w.clone() for w in ws]
        for i in active:
            if i < SPLIT:
                moved[i] = ws[i] + 20.0 * g0[i] / (norm + 1e-12)
        moved_all.append(moved)
        for i in active:
            ws[i] = base_update(OPT, ws[i], grad_fn(moved[i], coefs[i]), state[i], lrs[0 if i < SPLIT else 1])
    return ws, moved_all


@pytest.mark.parametrize("backend", BACKENDS)
def test_unperturbed_group_stays_and_is_out_of_the_norm(backend):
    params, opt, moved = run(backend)
    ws, moved64 = run_float64()
    atol, rtol = FP32["fp32_vs_float64"]
    for step, (m, m64) in enumerate(zip(moved, moved64)):
        for i, (a, b) in enumerate(zip(m, m64)):
            assert_close(a, b, atol, rtol, f"step {step}: w + e of {harness.SHAPES[i]}")
    for i, (p, w) in enumerate(zip(params, ws)):
        assert_close(p, w, atol, rtol, f"{harness.SHAPES[i]}")


def test_rho_zero_is_not_the_same_as_perturb_false():
    """A group with rho 0 is not moved but still counts in the norm; perturb=False leaves it out."""
    weights, coefs = problem(0)
    norms = []
    for kw in (dict(rho_second=0.0), dict(perturb_second=False)):
        params = make_params(weights, torch.float32, torch.device("cpu"))
        g = groups(params, **kw)
        if "rho_second" in kw:
            g[1]["perturb"] = True
        opt = FusedSAM(g, torch.optim.SGD, lr=0.1, backend="torch")
        set_grads(params, coefs)
        opt.first_step()
        norms.append(float(opt.grad_norm))
        opt.restore()
    g0 = [grad_fn(w.float().double(), c) for w, c in zip(weights, coefs)]
    assert norms[0] == pytest.approx(math.sqrt(sum(float((g ** 2).sum()) for g in g0)), rel=1e-5)
    assert norms[1] == pytest.approx(math.sqrt(sum(float((g ** 2).sum()) for g in g0[:SPLIT])), rel=1e-5)


def test_a_bad_gradient_in_an_unperturbed_group_is_refused_before_any_write():
    weights, coefs = problem(0)
    params = make_params(weights, torch.float32, torch.device("cpu"))
    opt = FusedSAM(groups(params), torch.optim.SGD, lr=0.1, backend="torch")
    set_grads(params, coefs)
    params[5].grad.data = torch.zeros(3)  # the transposed view's gradient, swapped for a wrong size
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not match"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("cls", [GSAM, LookSAM])
def test_combinations_refuse_an_unperturbed_group(cls):
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="perturb=False"):
        cls([{"params": [p]}, {"params": [q], "perturb": False}], torch.optim.SGD, lr=0.1)


def test_perturb_must_be_a_bool():
    with pytest.raises(TypeError, match="perturb"):
        FusedSAM([{"params": [torch.nn.Parameter(torch.randn(2))], "perturb": 0}], torch.optim.SGD, lr=0.1)


def test_norm_layer_param_groups():
    class RMSNorm(torch.nn.Module):  # a library's own, as in many LLM codebases
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.lora_A = torch.nn.Parameter(torch.zeros(2, 4))
            self.ln = torch.nn.LayerNorm(4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.gn = torch.nn.GroupNorm(2, 4)
            self.rms = RMSNorm(4)
            self.frozen = torch.nn.LayerNorm(4)
            self.frozen.requires_grad_(False)

    model = Block()
    on, off = norm_layer_param_groups(model, lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in on["params"]) == sorted(
        ["lora_A", "ln.weight", "ln.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "rms.weight"])
    assert sorted(names[id(p)] for p in off["params"]) == ["fc.bias", "fc.weight"]
    assert on["perturb"] and not off["perturb"] and on["lr"] == off["lr"] == 0.1
    (only,) = [g for g in norm_layer_param_groups(model, include_lora=False) if g["perturb"]]
    assert "lora_A" not in {names[id(p)] for p in only["params"]}
    opt = FusedSAM(norm_layer_param_groups(model), torch.optim.SGD, rho=0.05, lr=0.1)
    assert [g["perturb"] for g in opt.param_groups] == [True, False]
