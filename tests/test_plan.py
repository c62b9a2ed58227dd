"""The cached step plan and the seams built on it: what a steady-state step does (and does not do),
when a plan is refreshed or rebuilt, the sum-of-squares hook, AMP scalars in the kernels, and a
SAM variant's own direction and gradient combination."""

from __future__ import annotations

import gc
import re
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sam_fused import FusedSAM, available_backends, constants
from sam_fused.plan import MAX_PLANS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
FAST = [b for b in BACKENDS if b != "torch"]
SPECS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def params_of(sizes=(5, 70_000, 3, 1000), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, dtype)) for n in sizes]


def grads_for(params, step, phase):
    gen = torch.Generator().manual_seed(1000 * step + phase)
    return [torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params]


def run(backend, spec, steps=4, in_place=False, **kw):
    params = params_of()
    cls, hyper = SPECS[spec]
    opt = FusedSAM(params, cls, rho=0.5, backend=backend, **hyper, **kw)
    for s in range(steps):
        for phase in (0, 1):
            for p, g in zip(params, grads_for(params, s, phase)):
                if in_place and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g
            (opt.first_step if phase == 0 else opt.second_step)()
    return params, opt


class Allocations(TorchDispatchMode):
    """Records every ATen op that returns a new tensor (not in place, not an out= variant, not a
    view), except those of Triton's CPU interpreter itself (it copies kernel arguments around; on
    a GPU there is no interpreter)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if not writes and not func.is_view:
            stack = traceback.extract_stack()
            if not any("triton/runtime/interpreter" in f.filename.replace("\\", "/") for f in stack):
                self.ops.append(f"{func} at {stack[-3].filename}:{stack[-3].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend", FAST)
def test_steady_state_step_allocates_and_uploads_nothing(backend, spec, monkeypatch):
    """With grads that stay in place, a warmed-up first_step + second_step creates no tensor and
    sends no pointer table: what a CUDA graph needs to capture it."""
    params, opt = run(backend, spec, steps=3, in_place=True)
    uploads = []
    if backend == "triton":
        from sam_fused.kernels import table

        original = table._upload
        monkeypatch.setattr(table, "_upload", lambda *a: uploads.append(a) or original(*a))
    plan = opt._backend.plan()
    for p, g in zip(params, grads_for(params, 9, 0)):
        p.grad.copy_(g)
    with Allocations() as mode:
        opt.first_step()
        opt.second_step()
    ops = [op for op in mode.ops if not op.startswith("aten._local_scalar_dense")]  # float(cpu tensor)
    assert ops == [], f"a steady-state step allocated: {ops}"
    assert uploads == []
    assert opt._backend.plan() is plan


@pytest.mark.parametrize("backend", FAST)
def test_new_grad_tensors_refresh_only_the_grad_column(backend):
    """zero_grad(set_to_none=True) style: new .grad tensors every step keep the plan and its
    buckets; results equal the reference's."""
    params, opt = run(backend, "sgd", steps=2)
    plan = opt._backend.plan()
    versions = [b.version for b in plan.buckets]
    for s in range(2, 4):
        for phase in (0, 1):
            for p, g in zip(params, grads_for(params, s, phase)):
                p.grad = g
            (opt.first_step if phase == 0 else opt.second_step)()
    assert opt._backend.plan() is plan
    assert all(b.version > v for b, v in zip(plan.buckets, versions))
    ref, _ = run("torch", "sgd", steps=4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_storage_replaced_between_steps(backend):
    """``p.data = new tensor`` moves the parameter: the plan is rebuilt, the kernels write the new
    storage (not the old), and the step equals the reference's."""
    results = []
    for b in (backend, "torch"):
        params, opt = run(b, "sgd", steps=2)
        old = params[1].data
        params[1].data = torch.linspace(-1, 1, 70_000, device=DEVICE)
        kept = old.clone()
        for phase in (0, 1):
            for p, g in zip(params, grads_for(params, 7, phase)):
                p.grad = g
            (opt.first_step if phase == 0 else opt.second_step)()
        assert torch.equal(old, kept)
        results.append(params)
    for p, r in zip(*results):
        torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf_in_the_update(backend, spec):
    """Gradients scaled by S with grad_scale=S give the unscaled step; found_inf != 0 leaves the
    weights restored exactly and the state untouched."""
    scale = torch.full((1,), 1024.0, device=DEVICE)
    clean, _ = run(backend, spec, steps=3)
    params, opt = run(backend, spec, steps=2)
    for phase in (0, 1):
        grads = grads_for(params, 2, phase)
        for p, g in zip(params, grads):
            p.grad = g * (scale if phase else 1.0)
        if phase == 0:
            opt.first_step()
        else:
            opt.second_step(grad_scale=scale, found_inf=torch.zeros(1, device=DEVICE))
    for p, c in zip(params, clean):
        torch.testing.assert_close(p, c, atol=1e-6, rtol=1e-5)

    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for p in params for k, v in opt.state[p].items() if torch.is_tensor(v)}
    for phase in (0, 1):
        for p, g in zip(params, grads_for(params, 3, phase)):
            p.grad = g
        if phase == 0:
            opt.first_step()
        else:
            opt.second_step(grad_scale=scale, found_inf=torch.ones(1, device=DEVICE))
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    after = {k: v for p in params for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_and_backups_are_bounded(backend):
    """Random subsets of parameters with grads: at most MAX_PLANS plans; a replaced parameter's
    backup dies with it."""
    params = params_of(sizes=(7,) * 6)
    opt = FusedSAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        mask = torch.rand(len(params), generator=gen) < 0.5
        for p, m in zip(params, mask.tolist()):
            p.grad = torch.randn_like(p) if m else None
        opt.first_step()
        opt.second_step()
    assert len(opt._backend.plans._plans) <= MAX_PLANS
    for _ in range(20):  # replace a 100k-element parameter again and again
        big = torch.nn.Parameter(torch.randn(100_000, device=DEVICE))
        opt.param_groups[0]["params"][0] = big
        big.grad = torch.randn_like(big)
        opt.first_step()
        opt.second_step()
    del big
    gc.collect()
    assert len(opt._backend.backups) <= len(params) + 1


def test_constants_match_the_native_header():
    """sam_fused/constants.py and csrc/sam_constants.h say the same, and the C++ update scalars are
    the folded ones in the order the host sends them."""
    csrc = Path(__file__).parents[1] / "csrc"
    header = (csrc / "sam_constants.h").read_text()
    math = (csrc / "sam_math.h").read_text()
    fields = re.search(r"struct UpdateScalars \{\s*acc_t ([^;]+);\s*acc_t ([^;]+);", math)
    names = [n.strip() for part in fields.groups() for n in part.split(",")]
    assert tuple(names) == constants.UPDATE_SCALARS
    values = dict(re.findall(r"constexpr \w+ (\w+) = ([0-9.e+-]+)f?;", header))
    assert int(values["kOptRestore"]) == constants.OPT_RESTORE
    assert int(values["kOptSgd"]) == constants.OPT_SGD
    assert int(values["kOptAdam"]) == constants.OPT_ADAM
    assert float(values["kNormEps"]) == constants.NORM_EPS
    assert int(values["kCudaChunk"]) == constants.CHUNK
    assert int(values["kUpdateScalars"]) == len(constants.UPDATE_SCALARS)


class _FakeEvent:
    """A CUDA event stand-in: done when the test says so."""

    def __init__(self):
        self.done, self.records = True, 0

    def record(self):
        self.done, self.records = False, self.records + 1

    def query(self):
        return self.done


def test_table_uploads_reuse_their_pinned_buffers_and_never_wait():
    """The staging ring of the Triton tables: a buffer is rewritten only after its copy ran (its event
    completed, asked with query(), never waited on); while all are in flight the ring grows; once
    the copies run, uploads allocate nothing more. Pinned memory and events faked (CPU here)."""
    from sam_fused.kernels.table import Staging

    events = []

    def event():
        events.append(_FakeEvent())
        return events[-1]

    staging = Staging(pinned=lambda n: torch.empty(n, dtype=torch.int64), event=event)
    dst = None
    for step in range(2):  # two uploads in flight at once: the ring grows to two buffers
        dst = staging.upload([step, 1, 2], dst, torch.device("cpu"))
        assert dst.tolist() == [step, 1, 2]
    assert staging.allocations == 2 and all(not e.done for e in events)
    for e in events:  # the copies ran
        e.done = True
    same = dst
    for step in range(10):
        dst = staging.upload([7, step, 9], dst, torch.device("cpu"))
        assert dst.tolist() == [7, step, 9]
        events[0].done = events[1].done = True
    assert staging.allocations == 2  # nothing more allocated
    assert dst is same  # the device array is rewritten in place: its address (and a captured graph) stays
    assert staging.upload(list(range(100)), dst, torch.device("cpu")).numel() == 100  # a larger table: new buffers
    assert staging.allocations == 3
