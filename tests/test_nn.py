"""sam_fused.nn: BatchNorm running statistics across a SAM step, and ASAM's param groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_fused import FusedSAM, available_backends
from sam_fused.nn import asam_param_groups, frozen_running_stats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)


def bn_stats(m):
    bn = m[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_after_a_sam_step_equal_one_plain_forward(backend):
    x, y = torch.randn(16, 6, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)
    sam_model, plain, unfrozen = bn_model(), bn_model(), bn_model()
    plain(x)  # one forward at w, in training mode
    for model, frozen in ((sam_model, True), (unfrozen, False)):
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.5, backend=backend)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model) if frozen else torch.enable_grad():
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for a, b in zip(bn_stats(sam_model), bn_stats(plain)):
        assert torch.equal(a, b)
    assert int(unfrozen[1].num_batches_tracked) == 2  # without the helper the perturbed pass counts
    assert sam_model[1].track_running_stats  # restored after the block


def test_frozen_forward_normalizes_with_the_batch():
    m = bn_model()
    x = torch.randn(16, 6, device=DEVICE)
    ref = copy.deepcopy(m)(x)
    with frozen_running_stats(m):
        out = m(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_running_stats_are_restored_when_the_block_raises():
    m = bn_model()
    with pytest.raises(ValueError), frozen_running_stats(m):
        raise ValueError
    assert m[1].track_running_stats


def authors_asam_ascent(model: nn.Module, rho: float, eta: float) -> None:
    """A transcription of the ASAM authors' ascent step (T = |w| + eta on parameters named
    *weight*, plain SAM on the others, one global norm, 1e-16 in the denominator)."""
    with torch.no_grad():
        grads = {}
        for n, p in model.named_parameters():
            t = (p.abs() + eta) if "weight" in n else torch.ones_like(p)
            grads[n] = (p.grad * t, t)
        norm = torch.norm(torch.stack([torch.norm(g) for g, _ in grads.values()])) + 1e-16
        for n, p in model.named_parameters():
            g, t = grads[n]
            p.add_(g * t * (rho / norm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_param_groups_match_the_authors_code(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DEVICE)
    twin, every = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(16, 6, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)
    groups = asam_param_groups(model, eta=0.01, rho=0.5)
    assert [len(g["params"]) for g in groups] == [2, 2] and [g["adaptive"] for g in groups] == [True, False]
    opt = FusedSAM(groups, torch.optim.SGD, lr=0.1, backend=backend)
    everywhere = FusedSAM(every.parameters(), torch.optim.SGD, lr=0.1, rho=0.5, adaptive=True, eta=0.01,
                          backend=backend)
    for m in (model, twin, every):
        F.cross_entropy(m(x), y).backward()
    opt.first_step()
    everywhere.first_step()
    authors_asam_ascent(twin, rho=0.5, eta=0.01)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    # adaptive on every parameter is another perturbation: the biases move by T^2 = (|b| + eta)^2
    bias, bias_every = model[0].bias - twin[0].bias, every[0].bias - twin[0].bias
    assert bias.abs().max() < 1e-5 < bias_every.abs().max()


def test_asam_param_groups_leave_out_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    groups = asam_param_groups(model, eta=0.0, lr=0.5)
    assert sum(len(g["params"]) for g in groups) == 3 and all(g["lr"] == 0.5 for g in groups)
