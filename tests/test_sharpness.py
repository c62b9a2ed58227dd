"""Sharpness measures against the exact Hessian of a tiny model, and landscape properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("scipy")
from sam_fused.tools.sharpness import (  # noqa: E402
    filter_normalized_direction,
    hessian_eigenvalues,
    hessian_frobenius,
    hessian_spectrum,
    hessian_trace,
    loss_landscape,
)

# Hutchinson estimates are checked to within Z_PROBES standard errors of the exact value: with a
# fixed seed the test is deterministic, and for an unbiased estimator a 4-sigma miss has
# probability ~6e-5 over seeds. A wrong estimator (wrong probe distribution, missing square,
# a factor off) lands many standard errors away, and the standard error itself is checked to be
# a small fraction of the value, so the bound cannot be vacuous.
Z_PROBES = 4.0
EIG_RTOL = 0.01  # the bound for Lanczos against the exact eigenvalues


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    return model, data


def exact_hessian(model, data):
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
    shapes = [p.shape for p in params]

    def loss_of(vec):
        chunks = torch.split(vec, [s.numel() for s in shapes])
        state = {n: c.view(s).float() for n, c, s in zip(names, chunks, shapes)}
        losses = [F.cross_entropy(torch.func.functional_call(model, state, (x,)), y) for x, y in data]
        return torch.stack(losses).mean().double()

    return torch.autograd.functional.hessian(loss_of, flat)


def test_top_eigenvalues_match_the_exact_hessian():
    model, data = tiny_problem()
    evals = torch.linalg.eigvalsh(exact_hessian(model, data)).flip(0)
    top = hessian_eigenvalues(model, F.cross_entropy, data, k=5)
    assert len(top.eigenvalues) == 5 and top.eigenvalues == sorted(top.eigenvalues, reverse=True)
    for got, want in zip(top.eigenvalues, evals[:5].tolist()):
        assert abs(got - want) <= EIG_RTOL * abs(evals[0].item()), (got, want)
    assert top.ratio == pytest.approx(top.eigenvalues[0] / top.eigenvalues[4])


def test_trace_and_frobenius_match_the_exact_hessian():
    model, data = tiny_problem()
    h = exact_hessian(model, data)
    tr = hessian_trace(model, F.cross_entropy, data, num_probes=300, seed=1)
    fro = hessian_frobenius(model, F.cross_entropy, data, num_probes=300, seed=1)
    exact_tr = torch.trace(h).item()
    exact_fro = (h * h).sum().item()
    assert 0 < tr.stderr < 0.2 * abs(exact_tr)
    assert 0 < fro.stderr < 0.2 * exact_fro
    assert abs(tr.value - exact_tr) <= Z_PROBES * tr.stderr, (tr.value, exact_tr, tr.stderr)
    assert abs(fro.value - exact_fro) <= Z_PROBES * fro.stderr, (fro.value, exact_fro, fro.stderr)
    assert len(tr.samples) == 300


def test_spectrum_covers_the_eigenvalues_and_integrates_to_one():
    model, data = tiny_problem()
    evals = torch.linalg.eigvalsh(exact_hessian(model, data))
    spec = hessian_spectrum(model, F.cross_entropy, data, num_probes=3, lanczos_steps=40)
    integral = float(((spec.density[1:] + spec.density[:-1]) / 2 * (spec.grid[1:] - spec.grid[:-1])).sum())
    assert integral == pytest.approx(1.0, abs=0.02)
    assert spec.grid[0] <= evals.min().item() and spec.grid[-1] >= evals.max().item()
    # with as many Lanczos steps as dimensions, the extreme Ritz values are the extreme eigenvalues
    assert max(n.max() for n in spec.nodes) == pytest.approx(evals.max().item(), rel=1e-3)


def test_measures_leave_the_model_bit_identical_and_in_its_mode():
    model, data = tiny_problem()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    hessian_eigenvalues(model, F.cross_entropy, data, k=2)
    hessian_trace(model, F.cross_entropy, data, num_probes=3)
    loss_landscape(model, F.cross_entropy, data, dims=2, steps=5)
    assert model.training
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_filter_normalization_gives_each_filter_its_weight_norm():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    direction = filter_normalized_direction(model, seed=3)
    for p, d in zip(model.parameters(), direction):
        if p.dim() <= 1:
            assert torch.equal(d, torch.zeros_like(p))  # biases and BN parameters are left out
        else:
            want = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            got = d.reshape(d.shape[0], -1).norm(dim=1)
            assert torch.allclose(got, want, rtol=1e-5)
    other = filter_normalized_direction(model, seed=3, ignore_biasbn=False)
    assert torch.equal(other[1], model[0].bias.detach())


def test_landscape_centre_is_the_model_loss(tmp_path):
    model, data = tiny_problem()
    with torch.no_grad():
        want = sum(F.cross_entropy(model.eval()(x), y).item() for x, y in data) / len(data)
    one = loss_landscape(model, F.cross_entropy, data, dims=1, steps=11, save=tmp_path / "one.png")
    assert one.losses[5] == pytest.approx(want, rel=1e-6) and one.center_loss == pytest.approx(want, rel=1e-6)
    two = loss_landscape(model, F.cross_entropy, data, dims=2, steps=7, save=tmp_path / "two.png")
    assert two.losses.shape == (7, 7) and two.losses[3, 3] == pytest.approx(want, rel=1e-6)
    assert (tmp_path / "one.png").stat().st_size > 1000 and (tmp_path / "two.png").stat().st_size > 1000


def test_landscape_towards_an_endpoint():
    model, data = tiny_problem()
    other, _ = tiny_problem(seed=1)
    land = loss_landscape(model, F.cross_entropy, data, endpoint=other, steps=9, span=1.0)
    # a runs over [-0.5, 1.5]: index 2 is this model, index 6 is the endpoint
    assert land.alphas[2] == pytest.approx(0.0) and land.alphas[6] == pytest.approx(1.0)
    with torch.no_grad():
        end_loss = sum(F.cross_entropy(other.eval()(x), y).item() for x, y in data) / len(data)
    assert land.losses[6] == pytest.approx(end_loss, rel=1e-5)
    assert land.losses[2] == pytest.approx(land.center_loss, rel=1e-6)


def test_bad_arguments():
    model, data = tiny_problem()
    with pytest.raises(ValueError, match="dims"):
        loss_landscape(model, F.cross_entropy, data, dims=3)
    with pytest.raises(ValueError, match="no batches"):
        hessian_trace(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, F.cross_entropy, data, k=10_000)
