"""The rank side of tests/test_deepspeed.py: a 2-process gloo group on the CPU runs every DeepSpeed
configuration in sequence (one launch: DeepSpeed's imports are most of a run's time); rank 0
saves what the test compares (full tensors) to ``out/<name>.pt``.

Shared with the test module: the model (an MLP, 7 -> 13 -> 3: flat sizes that split unevenly
over two ranks, with alignment padding), the data (global batches of 16) and the optimizers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS = 3
GLOBAL = 16
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)),
}
RHO = 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def data(steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL, 7, generator=gen), torch.randint(0, 3, (GLOBAL,), generator=gen)) for _ in range(steps)]


def micro_batches(x, y, rank, world, gas):
    """This rank's ``gas`` micro-batches of a global batch (equal sizes: their mean is the global mean)."""
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    return list(zip(xs.chunk(gas), ys.chunk(gas)))


def ds_config(stage: int, gas: int, world: int, bf16: str = "", clip: float = 0.0) -> dict:
    """``bf16``: "" (fp32), "bf16" (bf16 gradients), "bf16_fp32acc" (fp32 gradient accumulation)."""
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL // world // gas,
        "gradient_accumulation_steps": gas,
        "train_batch_size": GLOBAL,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32" if bf16 == "bf16_fp32acc" else "bf16"}
    return cfg


def setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops

    # an inference-only shared-memory op DeepSpeed would JIT-build (~60 s) on its first init
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def engine_for(opt_name: str, cfg: dict, model=None):
    import deepspeed

    model = make_model() if model is None else model
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def run_steps(engine, sam, batches, rank, world, gas, sam_on=True):
    losses = []
    for x, y in batches:
        mbs = micro_batches(x, y, rank, world, gas)
        dtype = next(engine.module.parameters()).dtype

        def closure():
            total = 0.0
            for xm, ym in mbs:
                loss = F.cross_entropy(engine(xm.to(dtype)).float(), ym)
                engine.backward(loss)
                total += float(loss) / gas
            return total

        if sam_on:
            losses.append(sam.step(closure))
        else:
            closure_loss = None
            for i, (xm, ym) in enumerate(mbs):
                engine.set_gradient_accumulation_boundary(i == gas - 1)
                engine.backward(F.cross_entropy(engine(xm.to(dtype)).float(), ym))
                closure_loss = 0
            engine.set_gradient_accumulation_boundary(True)
            engine.step()
    return losses


def full_params(engine):
    return [p.detach().float().clone() for p in engine.module.parameters()]


def main(rank: int, world: int, port: int, out: str, cases: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    setup(rank, world, port)
    import torch.distributed as dist

    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    out = Path(out)
    for case in cases:
        name, kind = case["name"], case.get("kind", "sam")
        cfg = ds_config(case["stage"], case["gas"], world, case.get("bf16", ""), case.get("clip", 0.0))
        engine = engine_for(case["opt"], cfg)
        sam = DeepSpeedSAM(engine, rho=case.get("rho", RHO), adaptive=case.get("adaptive", False),
                           backend=case.get("backend"))
        result = {"layout": sam.layout.kind}
        if kind == "sam":
            run_steps(engine, sam, data(), rank, world, case["gas"], sam_on=case.get("sam_on", True))
            result["params"] = full_params(engine)
        elif kind == "checkpoint":
            batches = data(4)
            run_steps(engine, sam, batches[:2], rank, world, case["gas"])
            ckpt = out / f"{name}_ckpt"
            engine.save_checkpoint(str(ckpt), tag="mid")
            run_steps(engine, sam, batches[2:], rank, world, case["gas"])
            result["uninterrupted"] = full_params(engine)
            engine2 = engine_for(case["opt"], cfg)
            sam2 = DeepSpeedSAM(engine2, rho=RHO)
            engine2.load_checkpoint(str(ckpt), tag="mid")
            run_steps(engine2, sam2, batches[2:], rank, world, case["gas"])
            result["resumed"] = full_params(engine2)
        elif kind == "refusals":
            result.update(refusals(engine, sam, rank, world, case["gas"]))
        dist.barrier()
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


def refusals(engine, sam, rank, world, gas) -> dict:
    """Calls that must be refused with the weights bit-identical, and a closure that raises after
    the perturbation (the weights restored to w)."""
    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    before = full_params(engine)
    found = {}
    for label, kw in {"rho_negative": dict(rho=-1.0), "rho_nan": dict(rho=float("nan")), "eta": dict(eta=-1.0)}.items():
        try:
            DeepSpeedSAM(engine, **kw)
        except ValueError as exc:
            found[label] = str(exc)
    try:
        sam.first_step()  # no backward yet
    except RuntimeError as exc:
        found["first_step_without_backward"] = str(exc)
    x, y = data(1)[0]
    xm, ym = micro_batches(x, y, rank, world, gas)[0]
    calls = []

    def failing():
        engine.backward(F.cross_entropy(engine(xm), ym))
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("second pass fails")
        return 0.0

    try:
        sam.step(failing)
    except KeyError:
        found["closure_raised"] = "restored"
    found["weights"] = [torch.equal(a, b) for a, b in zip(before, full_params(engine))]
    return {"refused": found}


if __name__ == "__main__":  # python tests/deepspeed_worker.py RANK WORLD PORT OUT CASES_JSON
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
