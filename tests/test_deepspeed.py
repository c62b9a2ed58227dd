"""DeepSpeedSAM (sam_fused.integrations.deepspeed) on a 2-process gloo group on the CPU: ZeRO stages
0, 1 and 2 equal single-process FusedSAM on the global batch (fp32: SGD-momentum and AdamW,
gradient accumulation 1 and 2, SAM and ASAM, the native kernels and the torch ops; bf16 with and
without fp32 gradient accumulation, against fp32 SAM with a stated tolerance and a control); the
engine's clipping acts on the second gradient only; a checkpoint round trip mid-training resumes
bit for bit; refused calls leave the weights bit-identical; the example script runs.

One launch runs every configuration in sequence (tests/deepspeed_worker.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import deepspeed_worker as W  # noqa: E402
from sam_fused import FusedSAM, available_backends  # noqa: E402
from tolerances import BF16_DEEPSPEED, FP32  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
NATIVE = "cpu" in available_backends(torch.device("cpu"))

FP32_CASES = [dict(name=f"z{stage}_{opt}_gas{gas}", stage=stage, opt=opt, gas=gas)
              for stage in (1, 2) for opt in sorted(W.OPTIMIZERS) for gas in (1, 2)]
FP32_CASES += [
    dict(name="z0_sgd_gas2", stage=0, opt="sgd", gas=2),
    dict(name="z2_adamw_gas2_asam", stage=2, opt="adamw", gas=2, adaptive=True),
    dict(name="z1_sgd_gas2_torchops", stage=1, opt="sgd", gas=2, backend="torch"),
    dict(name="z2_sgd_gas1_clip", stage=2, opt="sgd", gas=1, clip=0.05),
]
BF16_CASES = [dict(name=f"z{stage}_{bf16}", stage=stage, opt="sgd", gas=2, bf16=bf16)
              for stage in (1, 2) for bf16 in ("bf16", "bf16_fp32acc")]
OTHER_CASES = [
    dict(name="checkpoint", kind="checkpoint", stage=2, opt="adamw", gas=2),
    dict(name="refusals", kind="refusals", stage=1, opt="sgd", gas=1),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration, run once by a 2-process gloo group; returns the output folder."""
    out = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = FP32_CASES + BF16_CASES + OTHER_CASES
    mp.start_processes(W.main, args=(WORLD, port, str(out), cases), nprocs=WORLD, join=True, start_method="spawn")
    return out


def load(runs, name):
    ranks = torch.load(runs / f"{name}.pt")
    return ranks


def reference(opt_name, gas=1, adaptive=False, clip=0.0, sam=True, steps=W.STEPS):
    """Single-process FusedSAM (the torch backend) on the global batch; ``sam=False``: the base
    optimizer alone (the control)."""
    model = W.make_model()
    cls, kw = W.OPTIMIZERS[opt_name]
    params = list(model.parameters())
    opt = FusedSAM(params, cls, rho=W.RHO, adaptive=adaptive, backend="torch", **kw) if sam else cls(params, **kw)
    for x, y in W.data(steps):
        F.cross_entropy(model(x), y).backward()
        if sam:
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in params]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def assert_ranks_agree(ranks, key="params"):
    for other in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], other[key])), "ranks diverged"


@pytest.mark.parametrize("case", FP32_CASES, ids=[c["name"] for c in FP32_CASES])
def test_fp32_equals_single_process_sam(runs, case):
    ranks = load(runs, case["name"])
    assert_ranks_agree(ranks)
    assert ranks[0]["layout"] == ("plain" if case["stage"] == 0 else "zero")
    got = ranks[0]["params"]
    want = reference(case["opt"], case["gas"], case.get("adaptive", False), case.get("clip", 0.0))
    atol, rtol = FP32["deepspeed_vs_single"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    # the control: the same run without the perturbation is far outside that tolerance
    plain = reference(case["opt"], case["gas"], sam=False)
    assert max_diff(plain, want) > 100 * atol
    if case.get("clip"):  # the clipping acted: unclipped SAM is outside the tolerance too
        assert max_diff(reference(case["opt"], case["gas"]), want) > 100 * atol


@pytest.mark.parametrize("case", BF16_CASES, ids=[c["name"] for c in BF16_CASES])
def test_bf16_tracks_fp32_sam(runs, case):
    """bf16 working weights (and bf16 or fp32 gradients) against fp32 single-process SAM; the
    tolerance is set by bf16's rounding (tests/tolerances.py), and the same run without SAM is
    several times further away, so the comparison sees the SAM step."""
    ranks = load(runs, case["name"])
    assert_ranks_agree(ranks)
    assert ranks[0]["layout"] == ("bf16" if case["stage"] == 1 and case["bf16"] == "bf16_fp32acc" else "zero")
    want = reference(case["opt"], case["gas"])
    err = max_diff(ranks[0]["params"], want)
    assert err <= BF16_DEEPSPEED["atol"], err
    control = max_diff(reference(case["opt"], case["gas"], sam=False), want)
    assert control > BF16_DEEPSPEED["atol"] and control >= BF16_DEEPSPEED["control_factor"] * err, (control, err)


def test_checkpoint_round_trip_resumes_bit_for_bit(runs):
    ranks = load(runs, "checkpoint")
    r = ranks[0]
    assert len(r["uninterrupted"]) == len(r["resumed"]) == 4
    for a, b in zip(r["uninterrupted"], r["resumed"]):
        assert torch.equal(a, b)


def test_refused_calls_leave_weights_bit_identical(runs):
    for r in load(runs, "refusals"):
        found = r["refused"]
        for label in ("rho_negative", "rho_nan", "eta", "first_step_without_backward", "closure_raised"):
            assert label in found, (label, found)
        assert "rho must be a finite non-negative" in found["rho_negative"]
        assert all(found["weights"]) and len(found["weights"]) == 4


def test_version_parse():
    from sam_fused.integrations.deepspeed import TESTED, _version

    assert _version("0.19.8") == (0, 19, 8)
    assert _version("0.19.10+abc") == (0, 19, 10)
    lo, hi = TESTED
    assert lo <= _version("0.19.8") < hi and not _version("0.20.0") < hi


def test_zero3_and_example(tmp_path):
    """ZeRO-3 is refused naming what works, with the weights bit-identical; the example script
    trains with ZeRO-2 and resumes from its checkpoint identically. One launch (torchrun)."""
    from launch import torchrun

    root = Path(__file__).resolve().parents[1]
    out = torchrun(root / "examples" / "deepspeed_sam.py", "--steps", "4", "--check-zero3", "--out", tmp_path,
                   pythonpath=[root], timeout=240)
    assert "ZeRO-3 refused: True; weights unchanged: True" in out, out
    assert "resumed run identical: True" in out, out


def test_sam_trainer_on_deepspeed_equals_one_process_and_resumes(tmp_path):
    """SAMTrainer with a DeepSpeed config (ZeRO-2 through accelerate, two ranks with micro-batches
    of 4, accumulation 2, clipping, a linear schedule, 4 steps) equals the DeepSpeed-free
    SAMTrainer in one process with micro-batches of 8 on the same sequences; a run resumed from
    its step-2 checkpoint (DeepSpeed's own save and load) ends bit for bit where it did."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import trainer_ddp_worker as worker
    from launch import torchrun

    root = Path(__file__).resolve().parents[1]
    script = Path(__file__).with_name("trainer_ddp_worker.py")
    run = tmp_path / "run"
    for resume in ("0", "1"):
        torchrun(script, tmp_path / f"ds{resume}.pt", 4, "sam", 2, 2, run, resume,
                 pythonpath=[root, root / "tests"], timeout=240)
    assert (run / "checkpoint-2" / "global_step2").is_dir()  # the engine's checkpoint
    worker.main(str(tmp_path / "one.pt"), 8, "sam")
    got, one, resumed = (torch.load(tmp_path / n) for n in ("ds0.pt", "one.pt", "ds1.pt"))
    atol, rtol = FP32["deepspeed_vs_single"]
    for a, b in zip(got, one):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert all(torch.equal(a, b) for a, b in zip(got, resumed))
