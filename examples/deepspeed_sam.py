"""SAM over a DeepSpeed engine (ZeRO-2 here), on the CPU with gloo or on GPUs with NCCL.

    torchrun --standalone --nproc_per_node=2 examples/deepspeed_sam.py --steps 20
    deepspeed --num_gpus=2 examples/deepspeed_sam.py --stage 1 --bf16

It trains a small MLP for ``--steps`` SAM steps with gradient accumulation 2, saves a checkpoint
through the engine half-way, trains on, then loads the checkpoint into a fresh engine, trains the
same second half again and prints whether the two runs ended identically. ``--check-zero3`` also
shows that ZeRO-3 is refused, naming what works, with the weights untouched (compared whole,
gathered from the ranks' partitions, and partition by partition).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

import deepspeed
import deepspeed.ops

from sam_fused.integrations.deepspeed import DeepSpeedSAM


def config(stage: int, bf16: bool, world: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16 * world,
        "gradient_clipping": 1.0,  # DeepSpeed's clipping acts on SAM's second gradient
        "zero_allow_untested_optimizer": True,  # a client torch.optim optimizer
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_engine(args, world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=config(args.stage, args.bf16, world))
    return engine


def batches(steps: int, rank: int, device):
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    for _ in range(steps):
        yield [(torch.randn(8, 32, generator=gen).to(device), torch.randint(0, 10, (8,), generator=gen).to(device))
               for _ in range(2)]


def train(engine, sam, data):
    dtype = next(engine.module.parameters()).dtype
    loss = None
    for micro in data:
        def closure():
            total = 0.0
            for x, y in micro:  # every micro-batch of the step: engine.backward on each
                out = F.cross_entropy(engine(x.to(dtype)).float(), y)
                engine.backward(out)
                total += out.item() / len(micro)
            return total

        loss = sam.step(closure)
    return loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stage", type=int, default=2, choices=(0, 1, 2))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    p.add_argument("--check-zero3", action="store_true")
    args = p.parse_args()

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # an inference-only op it would JIT-build
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"

    engine = make_engine(args, world)
    sam = DeepSpeedSAM(engine, rho=args.rho)
    half = args.steps // 2
    data = list(batches(args.steps, rank, device))
    train(engine, sam, data[:half])
    out = [args.out or tempfile.mkdtemp()]
    torch.distributed.broadcast_object_list(out, src=0)  # one folder for every rank
    out = out[0]
    engine.save_checkpoint(os.path.join(out, "ckpt"), tag="half")
    loss = train(engine, sam, data[half:])
    final = [p.detach().clone() for p in engine.module.parameters()]

    fresh = make_engine(args, world)
    fresh_sam = DeepSpeedSAM(fresh, rho=args.rho)
    fresh.load_checkpoint(os.path.join(out, "ckpt"), tag="half")
    train(fresh, fresh_sam, data[half:])
    same = all(torch.equal(a, b.detach()) for a, b in zip(final, fresh.module.parameters()))
    flags = torch.tensor([int(same)])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    if rank == 0:
        print(f"last loss {loss:.4f}; step {engine.global_steps}; lr {engine.get_lr()[0]:.5f}")
        print(f"resumed run identical: {bool(flags.item())}")

    if args.check_zero3:
        # ZeRO-3 frees each param.data to an empty tensor between forwards: the weights to compare
        # are this rank's partitions (param.ds_tensor) and the whole parameters gathered from them
        args3 = argparse.Namespace(**{**vars(args), "stage": 3})
        engine3 = make_engine(args3, world)
        params3 = list(engine3.module.parameters())

        def weights():
            with deepspeed.zero.GatheredParameters(params3):
                whole = [p.detach().clone() for p in params3]
            return whole, [p.ds_tensor.detach().clone() for p in params3]

        before = weights()
        try:
            DeepSpeedSAM(engine3, rho=args.rho)
            refused, message = False, ""
        except NotImplementedError as exc:
            refused, message = True, str(exc)
        after = weights()
        same = [a.numel() > 0 and torch.equal(a, b) for kind in (0, 1) for a, b in zip(before[kind], after[kind])]
        flags = torch.tensor([int(all(same))])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        if rank == 0:
            n = sum(t.numel() for t in after[0])
            print(f"ZeRO-3 refused: {refused}; weights unchanged: {bool(flags.item())} ({n} elements gathered, "
                  f"each rank's partition too)")
            print(f"  {message}")
    torch.distributed.barrier()  # every rank done before the group goes away
    torch.distributed.destroy_process_group()  # gloo's threads joined here, not at interpreter exit


if __name__ == "__main__":
    main()
