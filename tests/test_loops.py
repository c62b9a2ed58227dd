"""The loop forms people write, each doing what it says: BatchNorm's running statistics counted once
per step in the closure form, schedules honoured in the hand-written form, and the misuses that
used to pass in silence (gradients left over or accumulated, a closure without backward, MSAM's
perturbed weights saved) either set right or warned of once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sam_fused import GSAM, MSAM, FrobSAM, FunctionalSAM, FusedSAM, LookSAM, available_backends
from sam_fused.nn import frozen_running_stats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).to(DEVICE)


def batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 6, generator=g).to(DEVICE), torch.randint(0, 3, (16,), generator=g).to(DEVICE)


CLOSURE_ALGOS = {
    "sam": lambda ps, b: FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "looksam": lambda ps, b: LookSAM(ps, torch.optim.SGD, k=2, lr=0.1, momentum=0.9, backend=b),
    "frobsam": lambda ps, b: FrobSAM(ps, torch.optim.SGD, lr=0.1),
    "functional": lambda ps, b: FunctionalSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
}


@pytest.mark.quick_subset("triton", [dict(algo="looksam")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(CLOSURE_ALGOS))
def test_closure_form_counts_batchnorm_once_per_step(backend, algo):
    """With freeze_running_stats(model), the running statistics after each step(closure) equal
    those of one forward per step at the weights the step started from."""
    model = bn_model()
    opt = CLOSURE_ALGOS[algo](list(model.parameters()), backend).freeze_running_stats(model)
    bn = model[1]
    for i in range(5):
        x, y = batch(i)
        start = [p.detach().clone() for p in model.parameters()]
        mean, var = bn.running_mean.clone(), bn.running_var.clone()

        def closure():
            if algo == "functional":  # the forward only, returning (loss, outputs)
                out = model(x)
                return F.cross_entropy(out, y), out
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        # the expected statistics: one forward at the step's starting weights
        probe = bn_model()
        with torch.no_grad():
            for q, w in zip(probe.parameters(), start):
                q.copy_(w)
        probe[1].running_mean.copy_(mean)
        probe[1].running_var.copy_(var)
        probe(x)
        assert torch.allclose(bn.running_mean, probe[1].running_mean, atol=1e-6)
        assert torch.allclose(bn.running_var, probe[1].running_var, atol=1e-6)
    assert int(bn.num_batches_tracked) == 5


def test_without_freeze_running_stats_the_closure_form_counts_every_forward():
    """The control: what freeze_running_stats changes (two forwards per SAM step)."""
    model = bn_model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    for i in range(5):
        x, y = batch(i)
        opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward())[1] or torch.zeros(()))
    assert int(model[1].num_batches_tracked) == 10


def test_freeze_running_stats_is_not_copied():
    import copy
    model = bn_model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch").freeze_running_stats(model)
    assert "_stats_of" not in copy.deepcopy(opt).__dict__
    with pytest.raises(TypeError, match="torch.nn.Module"):
        opt.freeze_running_stats(model.parameters())


# ---------------------------------------------------------------------- schedules by hand
SCHEDULED = {
    "interval": lambda ps, b: FusedSAM(ps, torch.optim.SGD, interval=3, lr=0.1, momentum=0.9, backend=b),
    "looksam": lambda ps, b: LookSAM(ps, torch.optim.SGD, k=3, lr=0.1, momentum=0.9, backend=b),
    "rst": lambda ps, b: FusedSAM(ps, torch.optim.SGD, sam_probability=0.5, seed=3, lr=0.1, momentum=0.9, backend=b),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)


@pytest.mark.quick_subset("triton", [dict(algo="interval", asks=False), dict(algo="looksam", asks=True)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(SCHEDULED))
@pytest.mark.parametrize("asks", [False, True])
def test_hand_written_loop_honours_the_schedule(backend, algo, asks):
    """first_step()/second_step() by hand make the schedule's plain steps plain: the weights equal
    those of step(closure) (which honours it), and with ``sam_due()`` the second pass is skipped."""
    runs = {}
    for form in ("closure", "hand"):
        model = _model()
        opt = SCHEDULED[algo](list(model.parameters()), backend)
        passes = 0
        for i in range(7):
            x, y = batch(i)

            def loss_backward():
                nonlocal passes
                passes += 1
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if form == "closure":
                opt.zero_grad()
                opt.step(lambda: (opt.zero_grad(), loss_backward())[1])
                continue
            due = opt.sam_due()
            opt.zero_grad()
            loss_backward()
            if asks and not due:
                opt.step()
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.first_step(zero_grad=True)
            loss_backward()
            opt.second_step(zero_grad=True)
        runs[form] = ([p.detach().clone() for p in model.parameters()], passes, opt.param_groups[0]["sam_step"])
    (wc, pc, sc), (wh, ph, sh) = runs["closure"], runs["hand"]
    assert sc == sh == 7
    for a, b in zip(wc, wh):
        assert torch.equal(a, b) if backend == "torch" else torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    if asks:
        assert ph == pc  # the plain steps ran one forward/backward
    else:
        assert ph == 14 > pc


def test_plain_first_step_warns_once_and_refuses_a_grad_scaler():
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, interval=2, lr=0.1, backend="torch")
    x, y = batch(0)
    for i in range(5):
        F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.first_step(zero_grad=True)
        assert len([m for m in w if "plain step of the schedule" in str(m.message)]) == (1 if i == 1 else 0)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**4)
    assert not opt.sam_due()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="scaler.step\\(opt\\)"):
        opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    scaler.step(opt)  # the plain step, with the scaler: one backward, unscaled in the update
    scaler.update()
    assert opt.param_groups[0]["sam_step"] == 6 and opt.sam_due()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------- silent misuse
def test_closure_form_without_zero_grad_is_warned_once():
    """A step(closure) loop whose closure never clears the gradients: its backward adds to the
    gradient the last step left (at w + e); warned once, with the fix. A closure that clears them
    (in place or by set_to_none) is not warned."""
    for clears in (None, "set_to_none", "in_place"):
        model = _model()
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for i in range(4):
                x, y = batch(i)

                def closure():
                    if clears:
                        opt.zero_grad(set_to_none=clears == "set_to_none")
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        warned = [m for m in w if "added to the gradient the last step left" in str(m.message)]
        assert len(warned) == (0 if clears else 1), clears


def test_second_backward_added_to_the_first_is_warned_once():
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    x, y = batch(0)
    for i in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.first_step()  # zero_grad=False
        F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.second_step(zero_grad=True)
        assert len([m for m in w if "g(w) + g(w + e)" in str(m.message)]) == (1 if i == 0 else 0)
    # no warning when the user clears in between, in place or by set_to_none
    for set_to_none in (True, False):
        opt2 = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
        F.cross_entropy(model(x), y).backward()
        opt2.first_step()
        opt2.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt2.second_step(zero_grad=True)
        assert not [m for m in w if "g(w) + g(w + e)" in str(m.message)]


@pytest.mark.parametrize("plain_steps", [False, True])
def test_hand_loop_without_zero_grad_after_second_step_is_warned_once(plain_steps):
    """first_step()/second_step() by hand, second_step() without zero_grad=True and no zero_grad()
    before the next backward: the next first gradient is g(w) + the g(w + e) left behind; warned
    once at that first_step, with the fix (a schedule's plain steps too). A loop that clears the
    gradients, in place, by set_to_none or by second_step(zero_grad=True), is not warned."""
    def run(clear):
        model = _model()
        kw = dict(interval=2) if plain_steps else {}
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch", **kw)
        x, y = batch(0)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(4):
                if clear in ("set_to_none", "in_place"):
                    opt.zero_grad(set_to_none=clear == "set_to_none")
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=clear == "second_step")
        return [m for m in w if "the last second_step() left" in str(m.message)]

    assert len(run(None)) == 1
    for clear in ("set_to_none", "in_place", "second_step"):
        assert run(clear) == [], clear


def test_closure_without_backward_is_warned_once_with_the_fix():
    model = _model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    x, y = batch(0)
    for i in range(2):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step(lambda: F.cross_entropy(model(x), y))
        messages = [str(m.message) for m in w]
        assert len([m for m in messages if "ran no backward()" in m]) == (1 if i == 0 else 0)
        assert not [m for m in messages if "Was zero_grad() called" in m]


def test_msam_state_dict_of_perturbed_weights_is_warned_once():
    model = _model()
    opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend="torch")
    x, y = batch(0)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with opt.unperturbed():
            opt.state_dict()
        assert not w
        opt.state_dict()
        opt.state_dict()
    assert len([m for m in w if "unperturbed()" in str(m.message)]) == 1
