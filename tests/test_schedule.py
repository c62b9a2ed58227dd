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
    both count, as the hand-written form's steps do (its plain step: first_step() makes it, the
    second_step() after it does nothing). step() on a SAM step without a first_step is refused,
    nothing written."""
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
            elif auto:
                o.step()
            else:
                with pytest.warns(UserWarning, match="plain step of the schedule"):
                    o.first_step()
                o.second_step()
    assert opt.param_groups[0]["sam_step"] == by_hand.param_groups[0]["sam_step"] == 3
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


# ---------------------------------------------------------------------- SAM phases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phase, sam_steps", [((2, 5), {2, 3, 4}), ((4, None), {4, 5, 6}),
                                               (lambda step: step % 4 == 1, {1, 5})])
def test_sam_phase(backend, phase, sam_steps):
    """SAM only inside the window: plain base-optimizer steps (one forward/backward) outside it."""
    model, opt = setup(backend, phase=phase)
    data = batches(7)
    assert run(model, opt, data) == [2 if i in sam_steps else 1 for i in range(7)]
    for a, b in zip(model.parameters(), emulate(sam_steps, data, backend)):
        assert torch.equal(a.detach(), b)
    assert all(g["sam_step"] == 7 for g in opt.param_groups)


def test_sam_phase_with_an_interval_inside_and_a_resume():
    data = batches(8)
    model, opt = setup(phase=(2, 8), interval=2)
    assert run(model, opt, data[:3]) == [1, 1, 2]
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = FusedSAM(model2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, phase=(2, 8), interval=2,
                    backend="torch")
    opt2.load_state_dict(sd)
    assert run(model, opt, data[3:]) == run(model2, opt2, data[3:]) == [1, 2, 1, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("phase", [(3, 3), (-1, 4), (1.5, 4), (2,), "late", (True, 3)])
def test_bad_phase_is_refused(phase):
    with pytest.raises(ValueError, match="phase"):
        setup(phase=phase)


def test_a_phase_step_that_fails_leaves_the_schedule():
    model, opt = setup(phase=(1, 3))
    data = batches(2)
    run(model, opt, data[:1])
    before = [p.detach().clone() for p in model.parameters()]

    def bad():
        loss = F.cross_entropy(model(data[1][0]), data[1][1])
        loss.backward()
        if opt._perturbed is not None:
            raise RuntimeError("out of memory")
        return loss

    opt.zero_grad()
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(bad)
    assert opt.param_groups[0]["sam_step"] == 1 and opt.sam_due()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
