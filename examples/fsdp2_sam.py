"""FusedSAM with FSDP2 (``torch.distributed.fsdp.fully_shard``), with a DCP checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_sam.py [--backend torch|triton|cuda|cpu] [--adaptive]

gloo on the CPU, nccl on GPUs. Parameters, gradients and optimizer state are DTensor shards; the
SAM norm is global (one all-reduced scalar on the device). Half-way the optimizer and model are
saved with torch.distributed.checkpoint and loaded into fresh ones; rank 0 prints the norm, the
loss and whether the resumed run matches an uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sam_fused import FusedSAM


def build(device, mesh, args):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 129), torch.nn.GELU(), torch.nn.Linear(129, 10)).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, adaptive=args.adaptive, backend=args.backend,
                   lr=1e-3, weight_decay=1e-2)
    return model, opt


def train(model, opt, batches):
    loss = None
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--adaptive", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    gen = torch.Generator().manual_seed(1000 + rank)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(7))
    batches = []
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        batches.append((x.to(device), (x @ teacher).argmax(1).to(device)))
    half = args.steps // 2

    model, opt = build(device, mesh, args)
    train(model, opt, batches)
    uninterrupted = [p.full_tensor() for p in model.parameters()]

    model, opt = build(device, mesh, args)
    train(model, opt, batches[:half])
    path = tempfile.mkdtemp() if rank == 0 else None
    holder = [path]
    dist.broadcast_object_list(holder)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=holder[0])
    model, opt = build(device, mesh, args)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=holder[0])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    loss = train(model, opt, batches[half:])
    same = all(torch.equal(a, p.full_tensor()) for a, p in zip(uninterrupted, model.parameters()))
    if rank == 0:
        print(f"FSDP2, {dist.get_world_size()} ranks, backend {opt.backend}: global grad norm "
              f"{opt.grad_norm.item():.4f}, last loss {loss.item():.4f}; resumed run identical: {same}")
    dist.barrier()  # every rank done before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
