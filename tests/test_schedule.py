"""Interval and randomized SAM (``FusedSAM(interval=k)`` / ``FusedSAM(sam_probability=p)``): which
``step(closure)`` calls are SAM steps, what a plain step does, reproducibility and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sam_fused import FusedSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def setup(backend="torch", **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(DEVICE)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend, **kw)
    return model, opt


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen).to(DEVICE), torch.randint(0, 3, (16,), generator=gen).to(DEVICE))
            for _ in range(n)]


class Closure:
    def __init__(self, model):
        self.model, self.calls, self.batch = model, 0, None

    def __call__(self):
        self.calls += 1
        loss = F.cross_entropy(self.model(self.batch[0]), self.batch[1])
        loss.backward()
        return loss


def run(model, opt, data):
    closure, calls = Closure(model), []
    for batch in data:
        closure.batch = batch
        before = closure.calls
        opt.zero_grad()
        opt.step(closure)
        calls.append(closure.calls - before)
    return calls


def emulate(sam_steps, data, backend="torch"):
    """The same run by hand: first/second_step on SAM steps, the base optimizer's step otherwise."""
    model, opt = setup(backend)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i in sam_steps:
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step()
        else:
            opt.base_optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_sam(backend):
    model, opt = setup(backend, interval=3)
    data = batches(7)
    assert run(model, opt, data) == [2, 1, 1, 2, 1, 1, 2]
    want = emulate({0, 3, 6}, data, backend)
    for a, b in zip(model.parameters(), want):
        assert torch.equal(a.detach(), b)
    assert all(g["sam_step"] == 7 for g in opt.param_groups)


def test_randomized_sam_is_reproducible_and_follows_its_probability():
    data = batches(12)
    model, opt = setup(sam_probability=0.5, seed=7)
    calls = run(model, opt, data)
    sam = {i for i, c in enumerate(calls) if c == 2}
    assert sam == {i for i in range(12) if opt.is_sam_step(i)} and 0 < len(sam) < 12
    again, opt2 = setup(sam_probability=0.5, seed=7)
    assert run(again, opt2, data) == calls
    other = setup(sam_probability=0.5, seed=8)[1]
    assert [other.is_sam_step(i) for i in range(64)] != [opt.is_sam_step(i) for i in range(64)]
    share = sum(setup(sam_probability=0.25, seed=3)[1].is_sam_step(i) for i in range(4000)) / 4000
    assert abs(share - 0.25) < 0.03  # 4000 draws: the standard deviation of the share is 0.007
    want = emulate(sam, data)
    for a, b in zip(model.parameters(), want):
        assert torch.equal(a.detach(), b)


def test_schedule_survives_a_checkpoint():
    data = batches(8)
    model, opt = setup(sam_probability=0.5, seed=11)
    run(model, opt, data)
    model2, opt2 = setup(sam_probability=0.5, seed=11)
    run(model2, opt2, data[:4])
    state = copy.deepcopy(opt2.state_dict())
    weights = copy.deepcopy(model2.state_dict())
    model3, opt3 = setup(sam_probability=0.5, seed=11)
    model3.load_state_dict(weights)
    opt3.load_state_dict(state)
    assert opt3.param_groups[0]["sam_step"] == 4
    run(model3, opt3, data[4:])
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_plain_step_with_a_prior_backward_calls_no_closure():
    """davda54 convention on a plain step: the gradients of the backward already run are used and
    the closure is not called at all."""
    model, opt = setup(interval=2)
    closure = Closure(model)
    for i, batch in enumerate(batches(4)):
        closure.batch = batch
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        before = closure.calls
        opt.step(closure)
        assert closure.calls - before == (1 if i % 2 == 0 else 0)


@pytest.mark.parametrize("kw, match", [
    (dict(interval=0), "interval"), (dict(interval=1.5), "interval"), (dict(sam_probability=0.0), "sam_probability"),
    (dict(sam_probability=1.5), "sam_probability"), (dict(interval=2, sam_probability=0.5), "exclude"),
])
def test_bad_schedules_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        setup(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_closure_in_a_loop_that_runs_its_own_backward(backend):
    """What SAMTrainer relies on: with a schedule, step() after a backward is the plain step the
    schedule makes; on a SAM step, first_step(), the second backward, then step() is the second step;
    both count. step() on a SAM step without a first_step is refused, nothing written."""
    model, opt = setup(backend, interval=2)
    data = batches(4)
    by_hand_model, by_hand = setup(backend, interval=2)
    for i, (x, y) in enumerate(data[:3]):
        for m, o, auto in ((model, opt, True), (by_hand_model, by_hand, False)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if i % 2 == 0:
                o.first_step(zero_grad=True)
                F.cross_entropy(m(x), y).backward()
                o.step() if auto else o.second_step()
            else:
                o.step() if auto else o.base_optimizer.step()
    assert opt.param_groups[0]["sam_step"] == 3
    for p, q in zip(model.parameters(), by_hand_model.parameters()):
        assert torch.equal(p, q)
    # step 3 is plain; then step 4 is a SAM step: step() alone is refused there
    opt.zero_grad()
    F.cross_entropy(model(data[3][0]), data[3][1]).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert opt.param_groups[0]["sam_step"] == 4
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
