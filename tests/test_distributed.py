"""torch.distributed on the CPU with gloo, two processes (tests/distributed_worker.py), against
single-process transcriptions: DDP global SAM equals SAM on the global batch; DDP m-sharpness
equals an emulation of per-rank perturbations; FSDP2 equals single-process SAM and ASAM with
SGD-momentum and AdamW on every CPU backend; a DCP checkpoint round trip continues identically."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch.distributed.fsdp")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import distributed_worker as W  # noqa: E402
from sam_fused import FusedSAM, available_backends  # noqa: E402
from tolerances import FP32  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
BACKENDS = [b for b in ("torch", "cpu", "triton") if b in available_backends(torch.device("cpu"))]
UNIVERSAL_BACKENDS = [b for b in ("torch", "triton") if b in BACKENDS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario, run once by a 2-process gloo group; returns the output folder."""
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(W.main, args=(WORLD, port, str(out), BACKENDS, UNIVERSAL_BACKENDS), nprocs=WORLD, join=True)
    return out


def assert_close(got, want, key="distributed_vs_single"):
    atol, rtol = FP32[key]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def reference_sam(cls, kw, adaptive=False, steps=W.STEPS):
    """Single-process SAM (the torch backend) on the global batch."""
    model = W.make_model()
    opt = FusedSAM(model.parameters(), cls, rho=0.1, adaptive=adaptive, backend="torch", **kw)
    W.sam_steps(model, opt, W.data(steps), 0, 1)
    return W.snapshot(model, opt), opt.grad_norm


def test_ddp_global_sam_is_sam_on_the_global_batch(runs):
    ranks = torch.load(runs / "ddp_global.pt")
    for other in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0], other)), "ranks diverged"
    want, _ = reference_sam(torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    assert_close(ranks[0], want[: len(ranks[0])])


def test_ddp_m_sharpness_is_per_rank_perturbation(runs):
    ranks = torch.load(runs / "ddp_m.pt")
    for other in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0], other)), "ranks diverged"
    # emulation: rank r perturbs with the gradient of its own half batch; the update averages the
    # gradients at the ranks' perturbed points
    model = W.make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for x, y in W.data():
        second = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            xs, ys = W.local_batch(x, y, r, WORLD)
            g = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, gi in zip(params, g):
                    p.add_(gi * (0.1 / (norm + 1e-12)).float())
            g2 = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            for acc, gi in zip(second, g2):
                acc += gi / WORLD
        for p, g in zip(params, second):
            p.grad = g
        base.step()
    assert_close(ranks[0], [p.detach() for p in params])
    global_sam = torch.load(runs / "ddp_global.pt")[0]
    assert not all(torch.allclose(a, b) for a, b in zip(ranks[0], global_sam)), "m-sharpness ran as global SAM"


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("opt_name", sorted(W.OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_equals_single_process(runs, backend, opt_name, adaptive):
    got, norm = torch.load(runs / f"fsdp_{backend}_{opt_name}_{int(adaptive)}.pt")
    cls, kw = W.OPTIMIZERS[opt_name]
    want, want_norm = reference_sam(cls, kw, adaptive)
    assert_close(got, want)
    # the norm is global: the square root of the all-reduced sum of the local squares
    torch.testing.assert_close(norm.reshape(()), want_norm.reshape(()), atol=0, rtol=FP32["norm_vs_float64"][1])


@pytest.mark.parametrize("measure", ["frob", "det"])
@pytest.mark.parametrize("backend", UNIVERSAL_BACKENDS)
def test_fsdp2_universal_equals_single_process(runs, backend, measure):
    """The universal class on FSDP2: each shard takes its part of the single-process noise draw and
    the losses are averaged over the ranks, so the run equals one process on the global batch."""
    got = torch.load(runs / f"universal_{backend}_{measure}.pt")
    model = W.make_model()
    W.universal_steps(model, W.make_universal(model, measure, backend), W.data(), 0, 1)
    assert_close(got, [p.detach() for p in model.parameters()])


@pytest.mark.parametrize("name", W.EFFICIENT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_gsam_looksam_msam_psam_fsam_equal_single_process(runs, backend, name):
    """GSAM, LookSAM, Momentum-SAM, the preconditioned perturbation and Functional-SAM with it: their
    inner products and norms are global, the local sums all-reduced over the shards."""
    got = torch.load(runs / f"efficient_{backend}_{name}.pt")
    model = W.make_model()
    W.universal_steps(model, W.make_efficient(model, name, "torch"), W.data(4), 0, 1)
    assert_close(got, [p.detach() for p in model.parameters()])


@pytest.mark.parametrize("name", ["", "msam_"])
def test_dcp_checkpoint_round_trip_continues_identically(runs, name):
    """FusedSAM (AdamW) and Momentum-SAM (SGD: its perturbed set and norm travel in the param groups)."""
    uninterrupted, resumed = torch.load(runs / f"dcp_{name}{BACKENDS[-1]}.pt")
    assert len(uninterrupted) == len(resumed) >= 8  # parameters and their state
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)


def test_first_pass_refuses_m_sharpness_without_ddp():
    from sam_fused.distributed import first_pass

    with pytest.raises(TypeError, match="DistributedDataParallel"):
        with first_pass(torch.nn.Linear(2, 2), m_sharpness=True):
            pass
    with first_pass(torch.nn.Linear(2, 2)):  # global SAM: nothing to do
        pass


@pytest.mark.parametrize("example, args, expect", [
    ("ddp_sam.py", ["--m-sharpness", "--steps", "5"], "ranks identical: True"),
    ("fsdp2_sam.py", ["--steps", "4", "--backend", "torch"], "resumed run identical: True"),
])
def test_torchrun_examples(example, args, expect):
    from pathlib import Path

    from launch import torchrun

    root = Path(__file__).resolve().parents[1]
    stdout = torchrun(root / "examples" / example, *args, pythonpath=[root])
    assert expect in stdout, stdout[-2000:]


def test_every_multi_process_script_destroys_its_group():
    """A script that starts a process group ends it (barrier, destroy_process_group): left to the
    interpreter's exit, gloo's threads were torn down unjoined and a rank died with SIGABRT
    ("terminate called without an active exception") after its work was done."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = [*sorted((root / "examples").glob("*.py")), *sorted((root / "tests").glob("*worker*.py"))]
    starts = ("init_process_group", "init_distributed", "WORLD_SIZE")  # the last: launched by torchrun
    checked = 0
    for path in scripts:
        text = path.read_text()
        if any(s in text for s in starts):
            checked += 1
            assert "destroy_process_group()" in text, f"{path.name} starts a process group and never destroys it"
    assert checked >= 5, checked
