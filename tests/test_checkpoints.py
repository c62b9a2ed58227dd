"""Checkpoints written before the backends were reorganized load into today's optimizers and the
next step is the step they would have made (``tests/data/checkpoints_v1.pt``, written by
``tests/data/make_checkpoints.py`` on the torch backend): the state-dict keys did not change."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from sam_fused import available_backends
from tolerances import FP32

DATA = Path(__file__).with_name("data")
sys.path.insert(0, str(DATA))
import make_checkpoints as M  # noqa: E402

SAVED = torch.load(DATA / "checkpoints_v1.pt", weights_only=False)["cases"]
BACKENDS = [b for b in ("torch", "cpu") if b in available_backends("cpu")]
UNIVERSAL = {"frob_sgd"}  # Frob/Trace/Det-SAM run on the torch and triton backends


def _resumed(name: str, backend: str, load: bool = True):
    cls, kw = M.CASES[name]
    net = M.model()
    with torch.no_grad():
        for p, w in zip(net.parameters(), SAVED[name]["weights"]):
            p.copy_(w)
    opt = cls(net.parameters(), backend=backend, **kw)
    if load:  # a copy: torch.optim's load keeps the dict's tensors as its state, and steps write them
        opt.load_state_dict(copy.deepcopy(SAVED[name]["state_dict"]))
    return net, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(M.CASES))
def test_an_old_checkpoint_resumes_where_it_left_off(name, backend):
    if name in UNIVERSAL and backend != "torch":
        pytest.skip("the universal class has no native backend")
    net, opt = _resumed(name, backend)
    M.step(opt, net, 3)
    atol, rtol = FP32["fast_vs_reference"]
    for got, want in zip(net.parameters(), SAVED[name]["after"]):
        torch.testing.assert_close(got.detach(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", sorted(M.CASES))
def test_the_comparison_sees_a_lost_state(name):
    """Without the checkpoint's state (a fresh optimizer on the same weights) the next step is
    another one: the test above would notice a state dict that loads but is not used."""
    net, opt = _resumed(name, "torch", load=False)
    M.step(opt, net, 3)
    atol, rtol = FP32["fast_vs_reference"]
    with pytest.raises(AssertionError):
        for got, want in zip(net.parameters(), SAVED[name]["after"]):
            torch.testing.assert_close(got.detach(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", sorted(M.CASES))
def test_the_keys_are_the_ones_saved(name):
    net, opt = _resumed(name, "torch")
    old, new = SAVED[name]["state_dict"], opt.state_dict()
    assert [sorted(g) for g in old["param_groups"]] == [sorted(g) for g in new["param_groups"]]
    assert {k: sorted(v) for k, v in old["state"].items()} == {k: sorted(v) for k, v in new["state"].items()}
