"""The warning of a perturbation that is a large fraction of the weights' norm: FusedSAM (SAM and
ASAM) and MSAM measure ||e|| / ||w|| once, at the first step that perturbs (one host read), and
warn once above ``LARGE_PERTURBATION``; nothing is measured after that step."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sam_fused import GSAM, MSAM, FusedSAM, available_backends
from sam_fused.optim.base import LARGE_PERTURBATION, LargePerturbationWarning, SAMOptimizer

BACKENDS = available_backends(torch.device("cpu"))


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.randn(16, 8), torch.randint(0, 3, (16,))


def weight_norm(model) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))


def train(opt, model, x, y, steps: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            if isinstance(opt, MSAM):
                closure()
                opt.step()
            else:
                opt.step(closure)
    return [w for w in caught if issubclass(w.category, LargePerturbationWarning)]


def make(cls, model, rho, backend, **kw):
    return cls(model.parameters(), torch.optim.SGD, rho=rho, lr=0.01, momentum=0.9, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedSAM, MSAM, GSAM])
def test_a_large_radius_warns_once_with_the_fraction(cls, backend):
    model, x, y = model_and_batch()
    norm = weight_norm(model)
    rho = 0.5 * norm  # half the weights' norm
    opt = make(cls, model, rho, backend)
    caught = train(opt, model, x, y, steps=4)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert opt.perturbation_fraction == pytest.approx(0.5, rel=1e-3)  # ||e|| = rho for SAM and MSAM
    assert "0.5 of the weights' norm" in message and f"above {LARGE_PERTURBATION:g}" in message
    assert type(opt).__name__ in message and "rho" in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [FusedSAM, MSAM])
def test_a_small_radius_does_not_warn(cls, backend):
    model, x, y = model_and_batch()
    opt = make(cls, model, 0.01 * weight_norm(model), backend)
    assert train(opt, model, x, y, steps=3) == []
    assert opt.perturbation_fraction == pytest.approx(0.01, rel=1e-3)


def test_asam_measures_the_perturbation_it_makes():
    """ASAM's ||e|| is rho * ||T^2 g|| / ||T g||, not rho: the fraction is of what moved."""
    model, x, y = model_and_batch()
    opt = make(FusedSAM, model, 2.0, "torch", adaptive=True, eta=0.01)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    e = float(torch.sqrt(sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(model.parameters(), before))))
    opt.second_step()
    assert opt.perturbation_fraction == pytest.approx(e / weight_norm_of(before), rel=1e-6)
    assert abs(e - 2.0) > 0.1  # not rho


def weight_norm_of(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


@pytest.mark.parametrize("cls", [FusedSAM, MSAM])
def test_nothing_is_measured_after_the_first_step(cls, monkeypatch):
    """The one host read is at the first step that perturbs: later steps never call it."""
    calls = []
    note = SAMOptimizer._note_perturbation

    def spy(self, *args):
        calls.append(self._perturbation_checks)
        return note(self, *args)

    monkeypatch.setattr(SAMOptimizer, "_note_perturbation", spy)
    model, x, y = model_and_batch()
    opt = make(cls, model, 0.05, "torch")
    train(opt, model, x, y, steps=6)
    assert calls == [SAMOptimizer._perturbation_checks] and opt._perturbation_checks == 0


def test_a_skipped_perturbation_measures_at_the_next_step():
    """No gradient moved anything (a zero gradient here, an inf under AMP): the next step measures."""
    model, x, y = model_and_batch()
    opt = make(FusedSAM, model, 0.5 * weight_norm(model), "torch")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    opt.second_step()
    assert opt.perturbation_fraction is None
    assert len(train(opt, model, x, y, steps=2)) == 1 and opt.perturbation_fraction == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("cls", [FusedSAM, MSAM])
def test_the_warning_names_the_callers_line(cls):
    model, x, y = model_and_batch()
    opt = make(cls, model, 0.5 * weight_norm(model), "torch")
    caught = train(opt, model, x, y, steps=1)
    assert len(caught) == 1 and caught[0].filename == __file__
