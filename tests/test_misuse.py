"""Misuse a torch.optim user can reach by accident, on every algorithm and backend: each is refused
clearly, with parameters and state bit-identical, or works as torch.optim's own optimizers do."""

from __future__ import annotations

import pytest
import torch

from sam_fused import GSAM, MSAM, FrobSAM, FusedSAM, LookSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def snap(opt, params):
    state = {(i, k): v.clone() if torch.is_tensor(v) else v
             for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()}
    return [p.detach().clone() for p in params], state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def sam_step(opt, params):
    """One SAM step by hand (MSAM: its single step)."""
    for p in params:
        p.grad = torch.randn_like(p)
    if isinstance(opt, MSAM):
        opt.step()
        return
    opt.first_step()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.second_step()


ALGOS = {
    "sam": lambda ps, b: FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "msam": lambda ps, b: MSAM(ps, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("swap", ["shorter", "float64", "longer"])
def test_gradient_swapped_in_place_is_refused(backend, algo, swap):
    """``p.grad.data = x`` keeps the .grad object and skips the setter's checks: the plan must see
    the new size and dtype before a kernel reads it."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000, device=DEVICE)), torch.nn.Parameter(torch.randn(7, device=DEVICE))]
    opt = ALGOS[algo](params, backend)
    sam_step(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    g = params[0].grad
    g.data = {"shorter": torch.randn(100, device=DEVICE), "float64": torch.randn(5000, device=DEVICE, dtype=torch.float64),
              "longer": torch.randn(6000, device=DEVICE)}[swap]
    assert params[0].grad is g
    before = snap(opt, params)
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.step() if algo == "msam" else opt.first_step()
    assert same(snap(opt, params), before)
