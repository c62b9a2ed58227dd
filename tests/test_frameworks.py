"""The framework examples in ``examples/``: Lightning manual optimization and accelerate give the
weights of a hand-written loop, bit for bit, in both step styles. Skipped when the framework is
not installed (the ``dev`` extra installs both: they leave torch as it is)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def equal(a, b):
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("mode", ["closure", "manual"])
def test_lightning_manual_optimization(mode):
    pytest.importorskip("lightning")
    import lightning_sam

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = lightning_sam.train(mode, epochs=2, backend="torch")
    scheduler = [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert not scheduler, scheduler[0].message
    assert equal(module.net, lightning_sam.train_by_hand(epochs=2, backend="torch"))
    if mode == "closure":
        assert module.closure_calls == 2 * 2 * 8  # two passes per step, 8 batches, 2 epochs


@pytest.mark.parametrize("mode", ["closure", "manual"])
def test_accelerate(mode):
    pytest.importorskip("accelerate")
    import accelerate_sam

    net = accelerate_sam.train(mode, epochs=2, backend="torch", cpu=True)
    assert equal(net, accelerate_sam.train_by_hand(epochs=2, backend="torch"))
