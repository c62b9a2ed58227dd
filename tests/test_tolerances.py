"""The tolerance rules themselves: they hold where the data is badly conditioned, and they fail on
a planted error (tests/tolerances.py)."""

from __future__ import annotations

import pytest
import torch

from lockstep import run_lockstep
from sam_fused import FusedSAM
from tolerances import FP32, rmsprop_step_bound

HP = dict(lr=0.01, alpha=0.99, eps=1e-8, momentum=0.5, weight_decay=0.0)


def _badly_conditioned(n=20000, seed=0):
    """Weights, RMSprop state and two fp32 gradients that differ as two summation orders make them
    differ (1e-7 relative, from the perturbation), with a fifth of the gradients near zero (down
    to eps) and a fifth of the second moments zero (a parameter's first step)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    tiny = torch.rand(n, generator=gen) < 0.2
    g[tiny] = g[tiny] * 10.0 ** -torch.randint(6, 9, (int(tiny.sum()),), generator=gen).float()
    v0 = torch.rand(n, generator=gen) * 1e-2
    v0[torch.rand(n, generator=gen) < 0.2] = 0.0
    buf0 = torch.randn(n, generator=gen)
    g2 = g + 1e-7 * torch.randn(n, generator=gen) * (g.abs() + 1e-2)
    return w, v0, buf0, g, g2


def _rmsprop_step(w, v0, buf0, g, lr=HP["lr"]):
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.RMSprop([p], **dict(HP, lr=lr))
    opt.state[p].update(step=torch.tensor(3.0), square_avg=v0.clone(), momentum_buffer=buf0.clone())
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    return {"weight": p.detach(), "square_avg": st["square_avg"], "momentum_buffer": st["momentum_buffer"]}


def test_rmsprop_bound_holds_where_no_fixed_tolerance_does():
    w, v0, buf0, g, g2 = _badly_conditioned()
    a, b = _rmsprop_step(w, v0, buf0, g), _rmsprop_step(w, v0, buf0, g2)
    bound = rmsprop_step_bound(g, g2, w, v0, buf0, **HP)
    for name in a:
        err = (a[name].double() - b[name].double()).abs()
        assert (err <= bound[name]).all(), f"{name}: {float((err - bound[name]).max()):.3g} past the bound"
    atol, rtol = FP32["fast_vs_reference"]  # the fixed table cannot hold here: the conditioning is real
    assert ((a["weight"] - b["weight"]).abs() > atol + rtol * b["weight"].abs()).any()
    assert float(bound["weight"].max()) < 0.1 * HP["lr"] / HP["eps"]  # finite where the slope is bounded


def test_rmsprop_bound_catches_an_update_error():
    """A 1% error in the step that the gradients cannot explain fails the bound."""
    w, v0, buf0, g, _ = _badly_conditioned()
    a, b = _rmsprop_step(w, v0, buf0, g, lr=1.01 * HP["lr"]), _rmsprop_step(w, v0, buf0, g)
    bound = rmsprop_step_bound(g, g, w, v0, buf0, **HP)
    assert ((a["weight"].double() - b["weight"].double()).abs() > bound["weight"]).any()
    assert torch.equal(bound["weight"] > 0, torch.ones_like(w, dtype=torch.bool))


def test_lockstep_catches_a_1_percent_rho_error():
    assert run_lockstep("torch", FusedSAM, 2) == 2
    with pytest.raises(AssertionError, match="w \\+ e"):
        run_lockstep("torch", FusedSAM, 2, rho_scale=1.01)
