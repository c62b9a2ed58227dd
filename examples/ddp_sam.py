"""FusedSAM with DistributedDataParallel: global SAM or m-sharpness.

    torchrun --nproc_per_node=2 examples/ddp_sam.py                  # global SAM
    torchrun --nproc_per_node=2 examples/ddp_sam.py --m-sharpness    # per-rank perturbations

gloo on the CPU, nccl on GPUs (one per rank). Prints, on rank 0, the loss and whether the ranks
hold bit-identical weights after training (they must, in both modes).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sam_fused import FusedSAM
from sam_fused.distributed import first_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m-sharpness", action="store_true", help="perturb with each rank's own gradient")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch (m for m-sharpness)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(7))
    for step in range(args.steps):
        x = torch.randn(args.batch, 32, generator=gen)
        y = (x @ teacher).argmax(1)
        x, y = x.to(device), y.to(device)
        with first_pass(model, m_sharpness=args.m_sharpness):  # no_sync() for m-sharpness, forward included
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()  # always synchronized: one averaged update
        opt.second_step(zero_grad=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered)
        mode = "m-sharpness" if args.m_sharpness else "global SAM"
        print(f"{mode}, {world} ranks, {args.steps} steps: last loss {loss.item():.4f}; ranks identical: {same}")
    dist.barrier()  # every rank done before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
