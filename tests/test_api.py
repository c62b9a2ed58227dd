"""The optimizer contract: closure, schedulers, checkpoints, bad input, restore, determinism."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_TRITON
from sam_fused import BackendUnavailable, FusedSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def tiny_model(seed=0):
    # No bias before the BatchNorm: its gradient is zero up to rounding, and Adam would turn that
    # rounding noise into steps of size lr, which no cross-backend comparison could follow.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).to(DEVICE)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g).to(DEVICE), torch.randint(0, 3, (32,), generator=g).to(DEVICE)


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bitwise(a, b):
    """Same bits, element for element (so -0.0 != 0.0 and NaN payloads count)."""
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        bx, by = (t.detach().contiguous().view(_BITS[t.dtype]) for t in (x, y))
        assert torch.equal(bx, by)


def state_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


SPECS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


# ---------------------------------------------------------------------- step(closure)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_closure_equals_first_second(backend):
    x, y = batch()
    m1, m2 = tiny_model(), tiny_model()
    o1 = FusedSAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    o2 = FusedSAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(3):
        loss1 = o1.step(closure_for(m1, x, y))
        loss2 = F.cross_entropy(m2(x), y)
        loss2.backward()
        o2.first_step(zero_grad=True)
        F.cross_entropy(m2(x), y).backward()
        o2.second_step(zero_grad=True)
        o1.zero_grad()
        assert torch.equal(loss1.detach(), loss2.detach())
    assert_bitwise(snapshot(m1), snapshot(m2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_runs_closure_with_grad_enabled(backend):
    m = tiny_model()
    x, y = batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    before = snapshot(m)
    with torch.no_grad():
        opt.step(closure_for(m, x, y))
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshot(m)))


class Counted:
    """A closure that counts its calls (each one a forward and a backward)."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y, self.calls = model, x, y, 0

    def __call__(self):
        self.calls += 1
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss


def manual_steps(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step()


@pytest.mark.parametrize("zero_in_place", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_closure_torch_convention_calls_it_twice(backend, zero_in_place):
    """Nothing ran before step(closure): two forward/backward passes per step. Zeroing the grads in
    place (which bumps their version counters) is not mistaken for a backward."""
    x, y = batch()
    m1, m2 = tiny_model(), tiny_model()
    o1 = FusedSAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    o2 = FusedSAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    closure = Counted(m1, x, y)
    for step in range(3):
        o1.zero_grad(set_to_none=not zero_in_place)
        assert isinstance(o1.step(closure), torch.Tensor)
        assert closure.calls == 2 * (step + 1)
    manual_steps(m2, o2, x, y, 3)
    assert_bitwise(snapshot(m1), snapshot(m2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_closure_davda54_convention_calls_it_once(backend):
    """loss.backward() ran before step(closure) (davda54's SAM, pytorch_optimizer): those gradients
    make the perturbation and the closure runs once, at w + e; the result is the same SAM step."""
    x, y = batch()
    m1, m2 = tiny_model(), tiny_model()
    o1 = FusedSAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    o2 = FusedSAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    closure = Counted(m1, x, y)
    forwards = 0
    for step in range(3):
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        forwards += 1
        assert o1.step(closure) is None
        assert closure.calls == step + 1
    assert forwards + closure.calls == 6  # two passes per step, not three
    manual_steps(m2, o2, x, y, 3)
    assert_bitwise(snapshot(m1), snapshot(m2))
    # and back to the other convention in the same run
    o1.zero_grad()
    o1.step(closure)
    assert closure.calls == 5


def test_step_closure_batchnorm_statistics_follow_the_passes():
    """davda54 convention: the running statistics see two forwards per step, not three."""
    x, y = batch()
    m = tiny_model()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(m(x), y).backward()
    opt.step(Counted(m, x, y))
    assert int(m[1].num_batches_tracked) == 2


def test_step_without_closure_is_refused():
    m = tiny_model()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# ---------------------------------------------------------------------- the SAM geometry
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_moves_to_the_ball_boundary(backend, adaptive):
    """SAM: ||w' - w|| = rho. ASAM: ||(w' - w) / T|| = rho, with T = |w| + eta."""
    m = tiny_model()
    x, y = batch()
    rho, eta = 0.3, 0.01
    opt = FusedSAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=0.1, backend=backend)
    F.cross_entropy(m(x), y).backward()
    before = snapshot(m)
    opt.first_step()
    sq = 0.0
    for w0, p in zip(before, m.parameters()):
        e = (p.detach() - w0).double()
        if adaptive:
            e = e / (w0.double().abs() + eta)
        sq += float((e * e).sum())
    assert abs(sq**0.5 - rho) < 1e-4 * rho
    weighted = [(p.grad.double() * ((w0.double().abs() + eta) if adaptive else 1)) for w0, p in zip(before, m.parameters())]
    expected = sum(float((g * g).sum()) for g in weighted) ** 0.5
    assert abs(float(opt.grad_norm) - expected) <= 1e-5 * expected
    assert opt.grad_norm.device.type == DEVICE.type


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_restore(backend):
    """Perturb then restore with no update: every parameter bit-identical, generic and fused path."""

    class NoUpdate(torch.optim.Optimizer):
        def __init__(self, params, lr=0.0):
            super().__init__(params, dict(lr=lr))

        def step(self, closure=None):
            return None

    for cls, kw in ((NoUpdate, {}), (torch.optim.SGD, dict(lr=0.0))):
        params = [
            torch.nn.Parameter(torch.randn(278011, device=DEVICE) * 3),
            torch.nn.Parameter(torch.randn(17, 13, device=DEVICE).t()),
            torch.nn.Parameter(torch.randn(20, 10, device=DEVICE)[:, ::2]),
            torch.nn.Parameter(torch.randn(97, device=DEVICE).to(torch.bfloat16)),
        ]
        before = [p.detach().clone() for p in params]
        opt = FusedSAM(params, cls, rho=5.0, adaptive=True, eta=0.1, backend=backend, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.first_step()
        assert all(not torch.equal(p, b) for p, b in zip(params, before)), "the perturbation must move every param"
        opt.second_step()
        assert_bitwise([p.detach() for p in params], before)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_norm_skips_the_perturbation(backend):
    m = tiny_model()
    x, y = batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    F.cross_entropy(m(x), y).backward()
    first = next(m.parameters())
    first.grad[0, 0] = float("inf")
    before = snapshot(m)
    opt.first_step()
    assert_bitwise(snapshot(m), before)
    assert not torch.isfinite(opt.grad_norm)
    assert opt.restore()  # a skipped perturbation is still a first step to undo
    next(m.parameters()).grad[0, 0] = float("nan")
    opt.first_step()  # a NaN norm too
    assert_bitwise(snapshot(m), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_at_all_is_a_no_op(backend):
    m = tiny_model()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    before = snapshot(m)
    opt.first_step()
    opt.second_step()
    assert_bitwise(snapshot(m), before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameter_is_untouched(backend):
    m = tiny_model()
    x, y = batch()
    m[0].weight.requires_grad_(False)
    opt = FusedSAM(m.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
    frozen = m[0].weight.detach().clone()
    for _ in range(2):
        opt.step(closure_for(m, x, y))
        opt.zero_grad()
    assert torch.equal(m[0].weight, frozen)
    assert m[0].weight not in opt.state


# ---------------------------------------------------------------------- schedulers and groups
@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_takes_effect(backend):
    m = tiny_model()
    x, y = batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        opt.step(closure_for(m, x, y))
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = snapshot(m)
    opt.step(closure_for(m, x, y))
    assert_bitwise(snapshot(m), before)  # lr 0: the restore is exact and the update is zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_rho_and_add_param_group(backend):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    b = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    c = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    opt = FusedSAM([{"params": [a], "rho": 0.0}, {"params": [b]}], torch.optim.SGD, rho=0.2, lr=0.1,
                   momentum=0.9, backend=backend)
    opt.add_param_group({"params": [c], "lr": 0.5})
    assert opt.param_groups[2]["rho"] == 0.2 and opt.param_groups[2]["momentum"] == 0.9
    assert opt.param_groups is opt.base_optimizer.param_groups
    before = [t.detach().clone() for t in (a, b, c)]
    for t in (a, b, c):
        t.grad = torch.ones_like(t)
    opt.first_step()
    assert torch.equal(a, before[0])  # rho = 0 in its group
    assert not torch.equal(b, before[1]) and not torch.equal(c, before[2])
    opt.second_step()
    assert torch.allclose(c, before[2] - 0.5)  # its own lr, momentum buffer starts at g
    assert torch.allclose(b, before[1] - 0.1)


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_state_dict_round_trip_continues_bit_identically(backend, spec):
    cls, kw = SPECS[spec]
    x, y = batch()
    m1 = tiny_model()
    o1 = FusedSAM(m1.parameters(), cls, rho=0.1, backend=backend, **kw)
    for _ in range(3):
        o1.step(closure_for(m1, x, y))
        o1.zero_grad()
    sd = state_snapshot(o1)
    m2 = copy.deepcopy(m1)
    o2 = FusedSAM(m2.parameters(), cls, rho=0.1, backend=backend, **kw)
    o2.load_state_dict(sd)
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.step(closure_for(m, x, y))
            o.zero_grad()
    assert_bitwise(snapshot(m1), snapshot(m2))
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for k in s1:
        for key in s1[k]:
            assert torch.equal(s1[k][key], s2[k][key])


@pytest.mark.parametrize("fast", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_state_is_torch_optims_own(spec, fast):
    """Same keys, shapes and dtypes as torch.optim keeps; backups never saved; moves across backends."""
    cls, kw = SPECS[spec]
    x, y = batch()
    models, opts = {}, {}
    for backend in ("torch", fast):
        models[backend] = tiny_model()
        opts[backend] = FusedSAM(models[backend].parameters(), cls, rho=0.1, backend=backend, **kw)
        for _ in range(2):
            opts[backend].step(closure_for(models[backend], x, y))
            opts[backend].zero_grad()
    m = tiny_model()
    plain = cls(m.parameters(), **kw)
    F.cross_entropy(m(x), y).backward()
    plain.step()
    want = plain.state_dict()["state"]
    for backend, opt in opts.items():
        sd = opt.state_dict()
        assert set(sd["state"]) == set(want)
        for k, st in sd["state"].items():
            assert set(st) == set(want[k]), backend
            for key, v in st.items():
                assert v.shape == want[k][key].shape and v.dtype == want[k][key].dtype and v.device == want[k][key].device
        assert all({"rho", "adaptive", "eta", "lr"} <= set(g) for g in sd["param_groups"])
    # a checkpoint of the fast backend continues on the torch backend
    sd = copy.deepcopy(opts[fast].state_dict())
    m2 = copy.deepcopy(models[fast])
    o2 = FusedSAM(m2.parameters(), cls, rho=0.1, backend="torch", **kw)
    o2.load_state_dict(sd)
    for m, o in ((models[fast], opts[fast]), (m2, o2)):
        o.step(closure_for(m, x, y))
    for a, b in zip(snapshot(models[fast]), snapshot(m2)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(eta=-1.0), ValueError, "eta"),
        (dict(rho=float("nan")), ValueError, "rho"),
        (dict(backend="cuda-ish"), ValueError, "unknown backend"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(exc, match=match):
        FusedSAM([p], torch.optim.SGD, lr=0.1, **kwargs)


def test_base_optimizer_must_be_a_class():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="base_optimizer"):
        FusedSAM([p], torch.optim.SGD([p], lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        FusedSAM([p], dict, lr=0.1)


def test_unavailable_backend_says_why(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(3))  # CPU
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        FusedSAM([p], torch.optim.SGD, lr=0.1, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_leaves_everything_untouched(backend):
    m = tiny_model()
    x, y = batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    opt.step(closure_for(m, x, y))
    opt.zero_grad()
    before, state = snapshot(m), state_snapshot(opt)

    def untouched():
        assert_bitwise(snapshot(m), before)
        now = opt.state_dict()
        for k in state["state"]:
            assert torch.equal(now["state"][k]["momentum_buffer"], state["state"][k]["momentum_buffer"])

    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    untouched()

    F.cross_entropy(m(x), y).backward()
    m[0].weight.grad = m[0].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    untouched()

    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    untouched()
    opt.param_groups[0]["rho"] = 0.05

    with pytest.raises(ValueError, match="eta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, device=DEVICE))], "eta": -1})
    untouched()

    opt.first_step()  # sparse grads are refused in the second step too, before the restore
    perturbed = snapshot(m)
    F.cross_entropy(m(x), y).backward()
    m[0].weight.grad = m[0].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.second_step()
    assert_bitwise(snapshot(m), perturbed)


# ---------------------------------------------------------------------- determinism and launches
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_norm_is_deterministic():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (278011, 97, 1, 70000)]
    opt = FusedSAM(params, torch.optim.SGD, lr=0.0, backend="triton")  # lr 0: weights come back exactly
    for p in params:
        p.grad = torch.randn_like(p) * 1e3
    bits = set()
    for _ in range(3):
        opt.first_step()
        bits.add(opt.grad_norm.clone().view(torch.int32).item())
        opt.second_step()
    assert len(bits) == 1
    expected = sum(float((p.grad.double() ** 2).sum()) for p in params) ** 0.5
    assert abs(float(opt.grad_norm) - expected) <= 1e-5 * expected


def _counts_per_step(spec, backend, counts, instrument=None):
    """The counts of two steps each of optimizers over 3 and over 100 tensors; the base
    optimizer's own step() must not be called (it is replaced by None)."""
    cls, kw = SPECS[spec]
    seen = []
    for n in (3, 100):
        params = [torch.nn.Parameter(torch.randn(7, device=DEVICE)) for _ in range(n)]
        opt = FusedSAM(params, cls, rho=0.1, backend=backend, **kw)
        if instrument is not None:
            instrument(opt)
        opt.base_optimizer.step = None
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            counts.clear()
            opt.first_step()
            opt.second_step()
            seen.append(dict(counts))
    return seen


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("spec", ["sgd", "adamw"])
def test_triton_launches_do_not_grow_with_tensor_count(monkeypatch, spec):
    """One norm, one finalize, one perturb and one update launch per step for one bucket, for 3 or
    100 tensors; the base optimizer's own step() is never called."""
    from sam_fused.backends import triton_backend as tb

    counts = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("sq_partials", "finalize", "perturb_kernel", "restore_update"):
        monkeypatch.setattr(tb, name, counting(name, getattr(tb, name)))
    seen = _counts_per_step(spec, "triton", counts)
    assert seen[1] == seen[3] == {"sq_partials": 1, "finalize": 1, "perturb_kernel": 1, "restore_update": 1}


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="native extension unavailable")
@pytest.mark.parametrize("spec", ["sgd", "adamw"])
def test_native_calls_do_not_grow_with_tensor_count(monkeypatch, spec):
    """One sq_sum_, one perturb_ and one restore_update_ call per step for one bucket, for 3 or 100
    tensors; the base optimizer's own step() is never called."""
    from sam_fused import native

    module = native.load()
    counts = {}

    class Counting:
        def __getattr__(self, name):
            fn = getattr(module, name)

            def wrapper(*args, **kwargs):
                counts[name] = counts.get(name, 0) + 1
                return fn(*args, **kwargs)

            return wrapper

    seen = _counts_per_step(spec, "cpu", counts, lambda opt: setattr(opt._backend, "_C", Counting()))
    assert seen[1] == seen[3] == {"sq_sum_": 1, "perturb_": 1, "restore_update_": 1}


def test_default_backend_on_cpu_is_native_when_it_builds():
    p = torch.nn.Parameter(torch.randn(3))
    expected = "cpu" if "cpu" in available_backends("cpu") else "torch"
    assert FusedSAM([p], torch.optim.SGD, lr=0.1).backend == expected


def test_native_disabled_by_environment(monkeypatch):
    from sam_fused import native

    monkeypatch.setattr(native, "_MODULE", None)
    monkeypatch.setattr(native, "_ERROR", None)
    monkeypatch.setenv("SAM_FUSED_NATIVE", "0")
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(BackendUnavailable, match="SAM_FUSED_NATIVE=0"):
        FusedSAM([p], torch.optim.SGD, lr=0.1, backend="cpu")
    monkeypatch.setattr(native, "_MODULE", None)
    monkeypatch.setattr(native, "_ERROR", None)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_pointer_table_vector_access_only_when_every_address_is_aligned():
    from sam_fused.kernels.table import PointerTable

    base = torch.zeros(64, device=DEVICE)
    grad = torch.zeros(64, device=DEVICE)
    table = PointerTable().update(DEVICE, [(base[:8], grad[:8], None)])
    assert table.aligned  # allocations are aligned, a view at offset 0 too
    table = PointerTable().update(DEVICE, [(base[:8], grad[:8], None), (base[1:9], grad[1:9], None)])
    assert not table.aligned  # 4 bytes off: the kernels must not assume 16-byte alignment
    assert table.n_chunks == 2
