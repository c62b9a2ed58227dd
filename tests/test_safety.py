"""Nothing silently corrupts weights: every input is checked before the first write, a refused call
leaves parameters and state bit-identical, a failure after the perturbation restores the weights,
and copies of the optimizer work. One test per finding, on every backend that runs here."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from sam_fused import FusedSAM, FrobSAM, TraceSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
UNIVERSAL_BACKENDS = [b for b in BACKENDS if b in ("torch", "triton")]


def snap(tensors):
    return [t.detach().clone() for t in tensors]


def same_bits(a, b):
    return all(x.shape == y.shape and torch.equal(x.view(torch.uint8) if x.numel() else x,
                                                   y.view(torch.uint8) if y.numel() else y)
               for x, y in zip(a, b))


def state_of(opt):
    return {(i, k): v.clone() if torch.is_tensor(v) else v
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state.get(p, {}).items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items())


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
    x, y = torch.randn(16, 6, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)
    return m, x, y


def closure_of(m, x, y, fail_on=None):
    calls = [0]

    def closure():
        calls[0] += 1
        if fail_on is not None and calls[0] == fail_on:
            raise torch.cuda.OutOfMemoryError("simulated out of memory") if hasattr(torch.cuda, "OutOfMemoryError") \
                else RuntimeError("simulated")
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------- 1. non-dense channels_last
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_dense_channels_last_parameter_is_restored_exactly(backend):
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)[..., ::2])
    opt = FusedSAM([p], torch.optim.SGD, lr=0.0, rho=0.5, backend=backend)
    w0 = p.detach().clone()
    for _ in range(2):
        p.grad = torch.randn(p.shape, device=DEVICE)
        opt.first_step()
        assert not torch.equal(p, w0)
        opt.second_step()
        assert torch.equal(p, w0)


# ---------------------------------------------------------------------- 2. the perturbation never sticks
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_restores_the_weights_when_the_second_closure_raises(backend):
    m, x, y = model_and_batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    opt.step(closure_of(m, x, y))
    opt.zero_grad()
    before, state = snap(m.parameters()), state_of(opt)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure_of(m, x, y, fail_on=2))
    assert same_bits(snap(m.parameters()), before)
    assert same_state(state_of(opt), state)
    opt.zero_grad()
    opt.step(closure_of(m, x, y))  # the training loop goes on
    assert not same_bits(snap(m.parameters()), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_twice_is_refused_and_restore_undoes(backend):
    m, x, y = model_and_batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    w0 = snap(m.parameters())
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    perturbed = snap(m.parameters())
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    assert same_bits(snap(m.parameters()), perturbed)
    assert opt.restore() is True
    assert same_bits(snap(m.parameters()), w0)
    assert opt.restore() is False
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()


@pytest.mark.parametrize("cls", [FrobSAM, TraceSAM])
@pytest.mark.parametrize("backend", UNIVERSAL_BACKENDS)
def test_universal_restores_the_weights_when_a_sample_raises(backend, cls):
    m, x, y = model_and_batch()
    opt = cls(m.parameters(), torch.optim.SGD, lr=0.1, backend=backend, seed=0)
    w0 = snap(m.parameters())
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure_of(m, x, y, fail_on=3))
    assert same_bits(snap(m.parameters()), w0)


# ---------------------------------------------------------------------- 3. sizes are checked
@pytest.mark.parametrize("numel", [16, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_the_wrong_size_is_refused_before_any_write(backend, numel):
    p = torch.nn.Parameter(torch.randn(64, device=DEVICE))
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    sd = opt.state_dict()
    sd["state"] = {0: {"momentum_buffer": torch.randn(numel, device=DEVICE)}}
    opt.load_state_dict(sd)
    w0 = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.first_step()
    perturbed = p.detach().clone()
    buf = opt.state[p]["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match="momentum_buffer|size"):
        opt.second_step()
    assert torch.equal(p, perturbed)
    assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    opt.restore()
    assert torch.equal(p, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_resized_after_backward_is_refused(backend):
    p = torch.nn.Parameter(torch.randn(8, device=DEVICE))
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    p.grad = torch.randn_like(p)
    opt.first_step()
    opt.second_step()
    p.grad = torch.randn_like(p)
    p.data = torch.randn(65536, device=DEVICE)
    w0 = p.detach().clone()
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.first_step()
    assert torch.equal(p, w0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_replaced_between_the_steps_is_never_written_through_its_old_address(backend):
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 70_000, 3)]
    opt = FusedSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    w0 = snap(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    old = params[1].data
    kept = old.clone()
    params[1].data = torch.zeros(70_000, device=DEVICE)
    with pytest.raises(RuntimeError, match="new storage"):
        opt.second_step()
    assert torch.equal(old, kept)  # the old storage was not written (no stale address used)
    assert torch.equal(params[1], torch.zeros(70_000, device=DEVICE))
    assert same_bits([params[0], params[2]], [w0[0], w0[2]])
    assert opt.restore() is False
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()  # the optimizer goes on with the new storage
    opt.second_step()


# ---------------------------------------------------------------------- 4. nothing half-done
def test_expanded_parameter_is_refused_at_construction():
    base = torch.randn(1, 5, device=DEVICE)
    p = torch.nn.Parameter(base.expand(4, 5))
    with pytest.raises(ValueError, match="overlapping"):
        FusedSAM([torch.nn.Parameter(torch.randn(3, device=DEVICE)), p], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_state_missing_a_key_is_refused_before_any_write(backend):
    m, x, y = model_and_batch()
    opt = FusedSAM(m.parameters(), torch.optim.Adam, lr=1e-2, backend=backend)
    opt.step(closure_of(m, x, y))
    opt.zero_grad()
    for st in opt.state.values():
        del st["exp_avg_sq"]
    w0, state = snap(m.parameters()), state_of(opt)
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(m(x), y).backward()
    with pytest.raises((RuntimeError, KeyError)) as err:
        opt.second_step()
    if backend != "torch":  # the fused update says what is wrong; torch.optim raises its KeyError
        assert "another optimizer" in str(err.value)
    assert same_state(state_of(opt), state)
    opt.restore()
    assert same_bits(snap(m.parameters()), w0)


# ---------------------------------------------------------------------- 5. a parameter twice
def test_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="twice"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.optim's own warning about the duplicate
        FusedSAM([p, p], torch.optim.SGD, lr=0.1)


# ---------------------------------------------------------------------- 6. copies work
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_are_working_optimizers(backend, how):
    m, x, y = model_and_batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    opt.step(closure_of(m, x, y))
    opt.zero_grad()
    bundle = (m, opt)
    if how == "deepcopy":
        m2, opt2 = copy.deepcopy(bundle)
    elif how == "pickle":
        m2, opt2 = pickle.loads(pickle.dumps(bundle))
    else:
        buf = io.BytesIO()
        torch.save(bundle, buf)
        buf.seek(0)
        m2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.backend == opt.backend
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert list(opt2.param_groups[0]["params"])[0] is next(m2.parameters())
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.step(closure_of(mm, x, y))
    assert same_bits(snap(m.parameters()), snap(m2.parameters()))


def test_copy_between_the_steps_is_refused():
    m, x, y = model_and_batch()
    opt = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1)
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        copy.deepcopy(opt)


# ---------------------------------------------------------------------- 7. clear errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_added_to_the_base_optimizer_gets_the_defaults(backend):
    m, x, y = model_and_batch()
    params = list(m.parameters())
    opt = FusedSAM(params[:2], torch.optim.SGD, lr=0.1, rho=0.07, backend=backend)
    opt.base_optimizer.add_param_group({"params": params[2:]})
    opt.step(closure_of(m, x, y))
    assert opt.param_groups[1]["rho"] == 0.07


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_of_another_optimizer_is_refused_clearly(backend):
    m, x, y = model_and_batch()
    sgd = FusedSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    sgd.step(closure_of(m, x, y))
    adam = FusedSAM(m.parameters(), torch.optim.Adam, lr=0.1, backend=backend)
    adam.step(closure_of(m, x, y))
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        adam.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        sgd.load_state_dict(before)
    after = adam.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], before["state"][i][k]) for i in before["state"]
               for k in before["state"][i])


# ---------------------------------------------------------------------- 8. hyperparameters
@pytest.mark.parametrize("kw", [dict(rho=float("inf")), dict(rho=1e39), dict(eta=float("inf")), dict(rho=float("nan"))])
def test_non_finite_hyperparameters_are_refused(kw):
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="finite"):
        FusedSAM([p], torch.optim.SGD, lr=0.1, **kw)


# ---------------------------------------------------------------------- 10. float64 stays float64
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_perturbed_in_float64(backend):
    if backend == "cuda":
        pytest.skip("the CUDA kernels take float32/bf16/fp16 only; float64 takes the reference ops there")
    p = torch.nn.Parameter(torch.randn(1000, dtype=torch.float64, device=DEVICE))
    opt = FusedSAM([p], torch.optim.SGD, lr=0.0, rho=0.0, backend=backend)
    w0 = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.first_step()
    assert torch.equal(p, w0)  # rho = 0: e = 0, and w + 0 in float64 is w
    opt.second_step()
    opt2 = FusedSAM([p], torch.optim.SGD, lr=0.0, rho=1e-6, backend=backend)
    p.grad = torch.ones_like(p)
    opt2.first_step()
    e = (p - w0).detach()
    expected = 1e-6 / 1000**0.5  # 3e-8: below an fp32 ulp of |w| ~ 1, far above a float64 one
    assert torch.allclose(e, torch.full_like(e, expected), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- 11. grad_norm
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm_is_none_after_a_step_without_grads(backend):
    p = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    p.grad = torch.ones_like(p)
    opt.first_step(zero_grad=True)
    opt.second_step()
    assert opt.grad_norm is not None
    opt.first_step()
    assert opt.grad_norm is None
    opt.second_step()


# ---------------------------------------------------------------------- 12. the build lock
def test_stale_build_lock_is_removed(tmp_path):
    from sam_fused import native

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / "lock").write_text("")
    (tmp_path / native.OWNER_FILE).write_text(dead.stdout.strip())
    with pytest.warns(UserWarning, match="stale build lock"):
        native.clear_stale_lock(tmp_path, wait=5)
    assert not (tmp_path / "lock").exists()


def test_lock_of_a_live_build_times_out_with_its_name(tmp_path):
    from sam_fused import native

    (tmp_path / "lock").write_text("")
    (tmp_path / native.OWNER_FILE).write_text(str(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(native.NativeUnavailable, match=str(tmp_path / "lock")):
        native.clear_stale_lock(tmp_path, wait=0.5)
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "lock").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_the_wrong_size_on_the_generic_path_is_refused_before_any_write(backend):
    """float64 parameters take the generic path (restore + torch.optim's step) on the Triton
    backend: the state is checked there too, before the restore."""
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float64, device=DEVICE))
    opt = FusedSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    sd = opt.state_dict()
    sd["state"] = {0: {"momentum_buffer": torch.randn(16, dtype=torch.float64, device=DEVICE)}}
    opt.load_state_dict(sd)
    p.grad = torch.randn_like(p)
    opt.first_step()
    perturbed, buf = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match="does not fit"):
        opt.second_step()
    assert torch.equal(p, perturbed) and torch.equal(opt.state[p]["momentum_buffer"], buf)
