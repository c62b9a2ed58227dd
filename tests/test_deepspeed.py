"""DeepSpeedSAM (sam_fused.integrations.deepspeed) on a 2-process gloo group on the CPU: ZeRO stages
0, 1 and 2 equal single-process FusedSAM on the global batch (fp32: SGD-momentum and AdamW,
gradient accumulation 1 and 2, SAM and ASAM, the native kernels and the torch ops; bf16 with and
without fp32 gradient accumulation, against fp32 SAM with a stated tolerance and a control); the
engine's clipping acts on the second gradient only; the norm and the perturbation run in the
native kernels over the flat partitions where the code says so, the torch ops elsewhere; a SAM
step communicates one scalar all-reduce and one all-gather per param group beyond the engine's
own; DeepSpeedFunctionalSAM equals single-process FunctionalSAM; a checkpoint round trip
mid-training resumes bit for bit; refused calls and refused engines (ZeRO-3, offload, fp16, a SAM
client optimizer, an untested DeepSpeed) leave the weights bit-identical; the example script
runs; SAMTrainer on DeepSpeed equals DeepSpeedSAM driven by hand.

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
from sam_fused import FunctionalSAM, FusedSAM, available_backends  # noqa: E402
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
# two param groups (weights, biases): two flat buffers, so two all-gathers per perturbation
COLLECTIVE_CASES = [
    dict(name="comm_z1_gas2", kind="collectives", stage=1, opt="sgd", gas=2, groups=2),
    dict(name="comm_z2_gas2", kind="collectives", stage=2, opt="adamw", gas=2, groups=2),
    dict(name="comm_z1_bf16_fp32acc", kind="collectives", stage=1, opt="sgd", gas=1, groups=2, bf16="bf16_fp32acc"),
    dict(name="comm_z2_bf16", kind="collectives", stage=2, opt="sgd", gas=1, groups=2, bf16="bf16"),
    dict(name="comm_z0", kind="collectives", stage=0, opt="sgd", gas=1),
]
FUNCTIONAL_CASES = [
    dict(name="fsam_z1_sgd_gas1_hand", kind="functional", stage=1, opt="sgd", gas=1, hand=True),
    dict(name="fsam_z1_adamw_gas2", kind="functional", stage=1, opt="adamw", gas=2),
    dict(name="fsam_z2_sgd_gas2", kind="functional", stage=2, opt="sgd", gas=2),
    dict(name="fsam_z2_adamw_gas1", kind="functional", stage=2, opt="adamw", gas=1),
    dict(name="fsam_z2_sgd_gas2_clip", kind="functional", stage=2, opt="sgd", gas=2, clip=0.05),
]
OTHER_CASES = [
    dict(name="checkpoint", kind="checkpoint", stage=2, opt="adamw", gas=2),
    dict(name="refusals", kind="refusals", stage=1, opt="sgd", gas=1),
    dict(name="refused_configs", kind="refused_configs", stage=1, opt="sgd", gas=1),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration, run once by a 2-process gloo group; returns the output folder."""
    out = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = FP32_CASES + BF16_CASES + COLLECTIVE_CASES + FUNCTIONAL_CASES + OTHER_CASES
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


def functional_reference(opt_name, clip=0.0, steps=W.STEPS):
    """Single-process FunctionalSAM (the torch backend) on the global batch."""
    model = W.make_model()
    cls, kw = W.OPTIMIZERS[opt_name]
    opt = FunctionalSAM(model.parameters(), cls, rho=W.RHO, backend="torch", max_grad_norm=clip or None, **kw)
    for x, y in W.data(steps):
        opt.step(lambda: (lambda out: (F.cross_entropy(out, y), out))(model(x)))
    return [p.detach().clone() for p in model.parameters()]


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


def expected_kernels(case, partitions, steps=W.STEPS):
    """The calls recorded_kernels must see per SAM step: one native sq_sum_ and one perturb_ over
    every flat partition where the gradient has the weights' dtype (fp32; bf16 without fp32
    accumulation) and the kernels load; else the torch ops on each partition."""
    bf16 = case.get("bf16", "")
    grad = "torch.float32" if bf16 != "bf16" else "torch.bfloat16"
    native = NATIVE and case.get("backend") != "torch" and bf16 != "bf16_fp32acc"
    if native:
        one = [("native sq_sum_", partitions, [grad] * len(partitions)),
               ("native perturb_", partitions, [grad] * len(partitions))]
    else:
        one = [("torch sq", [p], [grad]) for p in partitions] + [("torch perturb", [p], [grad]) for p in partitions]
    return one * steps


@pytest.mark.parametrize("case", FP32_CASES + BF16_CASES, ids=[c["name"] for c in FP32_CASES + BF16_CASES])
def test_kernels_run_over_the_flat_partitions(runs, case):
    """The native kernels take this rank's flat working-weight partitions themselves (the
    addresses of parallel_partitioned_bit16_groups' / bf16_partitioned_groups' entries; stage 0:
    the parameters) in fp32 and in bf16 with bf16 gradients; bf16 with fp32 gradient accumulation
    and backend="torch" run the torch ops on the same tensors, and nothing else runs."""
    for r in load(runs, case["name"]):
        parts = r["partitions"]
        assert parts and all(n > 0 for _, n, _ in parts)
        want_dtype = "torch.float32" if not case.get("bf16") else "torch.bfloat16"
        assert all(dt == want_dtype for _, _, dt in parts), parts
        assert r["kernels"] == expected_kernels(case, parts), r["kernels"]


@pytest.mark.parametrize("case", COLLECTIVE_CASES, ids=[c["name"] for c in COLLECTIVE_CASES])
def test_a_sam_step_adds_one_scalar_all_reduce_and_one_all_gather_per_group(runs, case):
    """Every collective of two SAM steps, by phase, against the same engine's plain steps: each
    backward pass communicates what a plain step's pass does, second_step() (restore and
    engine.step()) what engine.step() does, and first_step(), all SAM adds, is one all-reduce of
    one fp64 element and one all_gather_into_tensor of this rank's partition per param group
    (stage 0: nothing)."""
    for r in load(runs, case["name"]):
        assert len(r["sam"]) == len(r["plain"]) == 2
        parts = r["partitions"]
        assert len(parts) == case.get("groups", 1) if case["stage"] else len(parts) == 4
        extra = [] if case["stage"] == 0 else (
            [("all_reduce", "torch.float64", 1)] + [("all_gather_into_tensor", dt, n) for n, dt in parts])
        for sam, plain in zip(r["sam"], r["plain"]):
            assert plain["pass"], "the engine's own reduction was not seen: the log is not counting"
            assert sam["pass1"] == plain["pass"] and sam["pass2"] == plain["pass"], (sam, plain)
            assert sam.get("second_step", []) == plain.get("step", []), (sam.get("second_step"), plain.get("step"))
            assert sam.get("first_step", []) == extra, sam.get("first_step")


def test_collective_log_counts_a_call_once():
    """The worker's log counts a deepspeed.comm call once, not again in the torch.distributed call
    it makes, and describes the tensor a rank contributes."""
    import types

    lower = types.SimpleNamespace(all_reduce=lambda tensor: tensor)  # as torch.distributed
    upper = types.SimpleNamespace(all_reduce=lambda tensor: lower.all_reduce(tensor))  # as DeepSpeed's backend
    log = W.CommLog()
    log._wrap(lower, "all_reduce")
    log._wrap(upper, "all_reduce")
    log.phase = "p"
    upper.all_reduce(torch.zeros(2))
    lower.all_reduce(torch.zeros(3, dtype=torch.float64))
    assert log.calls == {"p": [("all_reduce", "torch.float32", 2), ("all_reduce", "torch.float64", 3)]}
    out, inp = torch.zeros(8), torch.zeros(4)
    assert W._describe("all_gather_into_tensor", (out, inp), {}) == ("all_gather_into_tensor", "torch.float32", 4)
    assert W._describe("all_gather_into_tensor", (), dict(output_tensor=out, input_tensor=inp))[2] == 4


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=[c["name"] for c in FUNCTIONAL_CASES])
def test_functional_sam_equals_single_process_functional_sam(runs, case):
    """DeepSpeedFunctionalSAM (step(closure) and the hand-written form) equals single-process
    FunctionalSAM on the global batch within the fp32 tolerance; the controls: plain SAM and the
    base optimizer alone are each more than 100x the tolerance away, so the comparison sees the
    functional update gradient (not SAM's) and the perturbation."""
    ranks = load(runs, case["name"])
    assert_ranks_agree(ranks)
    assert ranks[0]["layout"] == ("plain" if case["stage"] == 0 else "zero")
    want = functional_reference(case["opt"], case.get("clip", 0.0))
    atol, rtol = FP32["deepspeed_vs_single"]
    for a, b in zip(ranks[0]["params"], want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    clip = case.get("clip", 0.0)
    assert max_diff(reference(case["opt"], case["gas"], clip=clip), want) > 100 * atol
    assert max_diff(reference(case["opt"], case["gas"], sam=False), want) > 100 * atol
    if clip:  # the engine's clipping acted on the update gradient
        assert max_diff(functional_reference(case["opt"]), want) > 100 * atol


def test_checkpoint_round_trip_resumes_bit_for_bit(runs):
    ranks = load(runs, "checkpoint")
    r = ranks[0]
    assert len(r["uninterrupted"]) == len(r["resumed"]) == 4
    for a, b in zip(r["uninterrupted"], r["resumed"]):
        assert torch.equal(a, b)


def test_refused_calls_leave_weights_bit_identical(runs):
    for r in load(runs, "refusals"):
        found = r["refused"]
        for label in ("rho_negative", "rho_nan", "eta", "second_wrapper", "first_step_without_backward",
                      "closure_raised"):
            assert label in found, (label, found)
        assert "rho must be a finite non-negative" in found["rho_negative"]
        assert "already wrapped" in found["second_wrapper"]
        assert all(found["weights"]) and len(found["weights"]) == 4
        for label, kind in (("f_detached_outputs", "ValueError"), ("f_unrelated_outputs", "RuntimeError"),
                            ("f_first_step_after_plain_backward", "RuntimeError"),
                            ("f_closure_returns_loss", "TypeError"), ("f_second_step_without_second_pass", "RuntimeError")):
            assert found.get(label, "").startswith(kind + ": DeepSpeedFunctionalSAM"), (label, found.get(label))
            assert found[label + "_weights"], label


def test_refused_engines_leave_weights_bit_identical(runs):
    """ZeRO-3, optimizer offload to the CPU (stages 1 and 2), fp16 (stages 0-2) and a SAM optimizer
    of this package as the client optimizer are refused at construction, with a message that names
    what works, before any write: every weight bit-identical (ZeRO-3's gathered from the
    partitions, all 146 elements, not its freed empty param.data) and engine.backward not wrapped.
    offload_optimizer with device "none" is no offload, and accepted."""
    works = "works: ZeRO stages 0 (fp32), 1 and 2 (fp32 or bf16, with or without fp32 gradient accumulation), " \
            "without offload"
    for r in load(runs, "refused_configs"):
        found = r["refused"]
        assert set(found) == set(W.REFUSED_CONFIGS)
        for label, (_, _, _, exception) in W.REFUSED_CONFIGS.items():
            entry = found[label]
            assert entry["exception"] == exception, (label, entry)
            assert entry["elements"] == sum(p.numel() for p in W.make_model().parameters()), (label, entry)
            assert len(entry["unchanged"]) == 4 and all(entry["unchanged"]), (label, entry)
            assert not entry["backward_wrapped"], label
            if exception == "NotImplementedError":
                assert works in entry["message"], (label, entry["message"])
        assert "ZeRO stage 3 partitions the parameters" in found["zero3"]["message"]
        assert "offload" in found["offload_optimizer_cpu_z1"]["message"]
        assert "fp16" in found["fp16_z1"]["message"]
        assert "hand deepspeed.initialize the base optimizer" in found["client_msam"]["message"]
        assert "MSAM does not run over the engine" in found["client_msam"]["message"]


def test_untested_deepspeed_versions_are_refused(monkeypatch):
    """Only the DeepSpeed releases in TESTED_VERSIONS pass, exactly (the internals read change
    between releases); the message names them. pyproject's extra pins the same."""
    import re

    import deepspeed

    from sam_fused.integrations import deepspeed as D

    assert D.TESTED_VERSIONS == ("0.19.8",)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = re.findall(r'^deepspeed = \["deepspeed==([^"]+)"\]$', pyproject, re.M)
    assert pins == list(D.TESTED_VERSIONS), pins
    for version in ("0.19.9", "0.20.0", "0.19.7", "0.19.8rc1", "0.19.8+abc", "1.0.0"):
        monkeypatch.setattr(deepspeed, "__version__", version)
        with pytest.raises(RuntimeError, match=r"tested with DeepSpeed 0\.19\.8 only; this is DeepSpeed " + re.escape(version)):
            D.DeepSpeedSAM(object(), rho=0.05)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    with pytest.raises(TypeError, match="engine must be a DeepSpeedEngine"):  # past the version check
        D.DeepSpeedSAM(object(), rho=0.05)


def test_zero3_and_example(tmp_path):
    """ZeRO-3 is refused naming what works, with the weights bit-identical (gathered whole and
    partition by partition: ZeRO-3's param.data is empty between forwards); the example script
    trains with ZeRO-2 and resumes from its checkpoint identically. One launch (torchrun)."""
    from launch import torchrun

    root = Path(__file__).resolve().parents[1]
    out = torchrun(root / "examples" / "deepspeed_sam.py", "--steps", "4", "--check-zero3", "--out", tmp_path,
                   pythonpath=[root], timeout=240)
    # every weight compared (32*64 + 64 + 64*10 + 10 = 2762 elements), not ZeRO-3's freed empty param.data
    assert "ZeRO-3 refused: True; weights unchanged: True (2762 elements gathered" in out, out
    assert "works: ZeRO stages 0 (fp32), 1 and 2 (fp32 or bf16" in out, out
    assert "resumed run identical: True" in out, out


# max_grad_norm of the Trainer runs: below the tiny GPT-2's gradient norms here (0.31-0.34
# measured), so that the clipping acts on every step
CLIP = 0.2


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The tiny GPT-2 of tests/trainer_ddp_worker.py, 4 steps, two ranks with micro-batches of 4,
    accumulation 2, ZeRO-2 (DeepSpeed's clipping at max_grad_norm CLIP, a linear schedule):
    SAMTrainer (checkpoints every 2 steps), SAMTrainer resumed from checkpoint-2, DeepSpeedSAM by
    hand without the Trainer, the plain DeepSpeed Trainer (no SAM); and the DeepSpeed-free
    SAMTrainer in one process with micro-batches of 8 on the same sequences."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import trainer_ddp_worker as worker
    from launch import torchrun

    tmp = tmp_path_factory.mktemp("trainer")
    root = Path(__file__).resolve().parents[1]
    script = Path(__file__).with_name("trainer_ddp_worker.py")
    run = tmp / "run"
    paths = [root, root / "tests"]
    clip = f"max_grad_norm={CLIP}"
    for resume in ("0", "1"):
        torchrun(script, tmp / f"ds{resume}.pt", 4, "sam", "deepspeed_stage=2", "save_steps=2", f"output_dir={run}",
                 f"resume={resume}", clip, pythonpath=paths, timeout=240)
    assert (run / "checkpoint-2" / "global_step2").is_dir()  # the engine's checkpoint
    for variant in ("hand", "plain"):
        torchrun(script, tmp / f"{variant}.pt", 4, variant, "deepspeed_stage=2", clip, pythonpath=paths, timeout=240)
    worker.main(str(tmp / "one.pt"), 8, "sam", max_grad_norm=CLIP)
    return tmp


def test_sam_trainer_on_deepspeed_equals_one_process_and_resumes(trainer_runs):
    """SAMTrainer with a DeepSpeed config (ZeRO-2 through accelerate) equals the DeepSpeed-free
    SAMTrainer in one process on the same sequences; a run resumed from its step-2 checkpoint
    (DeepSpeed's own save and load) ends bit for bit where it did."""
    got, one, resumed = (torch.load(trainer_runs / n) for n in ("ds0.pt", "one.pt", "ds1.pt"))
    atol, rtol = FP32["deepspeed_vs_single"]
    for a, b in zip(got, one):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert all(torch.equal(a, b) for a, b in zip(got, resumed))


def test_sam_trainer_on_deepspeed_equals_hand_driven_deepspeed_sam(trainer_runs):
    """SAMTrainer on DeepSpeed against DeepSpeedSAM's first_step()/second_step() around the
    user's own engine.backward calls (same model, base optimizer and groups, schedule, DeepSpeed
    config, micro-batches): equal within the fp32 tolerance, where the plain DeepSpeed Trainer
    (no SAM) is more than 100x the tolerance away. The clipping acted in those runs: the engine's
    pre-clip gradient norm exceeded max_grad_norm on every step, in the Trainer's run as by hand
    (and the two agree)."""
    import trainer_ddp_worker as worker

    got, hand, plain = (torch.load(trainer_runs / n) for n in ("ds0.pt", "hand.pt", "plain.pt"))
    atol, rtol = FP32["deepspeed_vs_single"]
    for a, b in zip(got, hand):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert max_diff(plain, hand) > 100 * atol, max_diff(plain, hand)
    norms, trainer_norms = (torch.load(trainer_runs / n) for n in ("hand.pt.norms", "ds0.pt.norms"))
    assert len(norms) == len(trainer_norms) == worker.STEPS
    assert min(norms) > CLIP, norms
    assert trainer_norms == pytest.approx(norms, rel=1e-5), (trainer_norms, norms)


def test_sam_trainer_on_deepspeed_refuses_what_does_not_run_there(trainer_runs):
    """MSAM, Functional-SAM and GSAM through SAMTrainer on a DeepSpeed config are refused at
    construction, saying why (MSAM) or what to use instead (Functional-SAM)."""
    found = torch.load(trainer_runs / "plain.pt.refused")
    assert set(found) == {"msam", "functional", "gsam"}, found
    assert all("runs sam_variant 'sam' or 'asam'" in m for m in found.values()), found
    assert "MSAM does not run over a DeepSpeed engine" in found["msam"]
    assert "DeepSpeedFunctionalSAM" in found["functional"]
