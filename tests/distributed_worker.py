"""The rank side of tests/test_distributed.py: every scenario, run once per rank of a 2-process
gloo group on the CPU; rank 0 saves what the test compares (full tensors) to ``out/<name>.pt``.

Scenarios share one model and one data set with ``reference_*`` in the test module: an MLP with
dim-0 sizes 13 and 3 (uneven shards over two ranks), a global batch of 16 split in two.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sam_fused import FusedSAM
from sam_fused.distributed import first_pass

STEPS = 3
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def data(steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 7, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(steps)]


def local_batch(x, y, rank, world):
    return x.chunk(world)[rank], y.chunk(world)[rank]


def sam_steps(model, opt, batches, rank, world, m_sharpness=False):
    for x, y in batches:
        xs, ys = local_batch(x, y, rank, world)
        with first_pass(model, m_sharpness):
            F.cross_entropy(model(xs), ys).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(xs), ys).backward()
        opt.second_step(zero_grad=True)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def snapshot(model, opt):
    """Full parameters and every full state tensor, in parameter order."""
    out = [full(p).detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for key in sorted(opt.state.get(p, {})):
            v = opt.state[p][key]
            if isinstance(v, torch.Tensor):
                out.append(full(v).clone())
    return out


def run_ddp(rank, world, out: Path):
    for m in (False, True):
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        sam_steps(model, opt, data(), rank, world, m_sharpness=m)
        result = [p.detach().clone() for p in model.parameters()]
        gathered = [None] * world
        dist.all_gather_object(gathered, result)  # the ranks must agree bit for bit
        if rank == 0:
            torch.save(gathered, out / f"ddp_{'m' if m else 'global'}.pt")


def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model, mesh=mesh)
    return model


def run_fsdp(rank, world, out: Path, backends):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for backend in backends:
        for opt_name, (cls, kw) in OPTIMIZERS.items():
            for adaptive in (False, True):
                model = fsdp_model(mesh)
                opt = FusedSAM(model.parameters(), cls, rho=0.1, adaptive=adaptive, backend=backend, **kw)
                sam_steps(model, opt, data(), rank, world)
                snap = snapshot(model, opt)
                norm = opt.grad_norm.clone()
                if rank == 0:
                    torch.save((snap, norm), out / f"fsdp_{backend}_{opt_name}_{int(adaptive)}.pt")


def universal_steps(model, opt, batches, rank, world):
    from sam_fused import FunctionalSAM

    for x, y in batches:
        xs, ys = local_batch(x, y, rank, world)

        def closure():
            out = model(xs)
            loss = F.cross_entropy(out, ys)
            if isinstance(opt, FunctionalSAM):  # the forward only: the optimizer runs both passes
                return loss, out
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)


def make_universal(model, measure, backend):
    from sam_fused import UniversalSAM

    return UniversalSAM(model.parameters(), torch.optim.SGD, measure=measure, rho=0.05, lam=0.1, seed=3,
                        backend=backend, lr=0.1, momentum=0.9)


def run_universal(rank, world, out: Path, backends):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for backend in backends:
        for measure in ("frob", "det"):
            model = fsdp_model(mesh)
            universal_steps(model, make_universal(model, measure, backend), data(), rank, world)
            params = [full(p).detach().clone() for p in model.parameters()]
            if rank == 0:
                torch.save(params, out / f"universal_{backend}_{measure}.pt")


EFFICIENT = ("gsam", "looksam", "msam_sgd", "msam_adamw", "psam", "fsam_p")


def make_efficient(model, name, backend):
    from sam_fused import GSAM, MSAM, FunctionalSAM, FusedSAM, LookSAM

    if name == "fsam_p":  # Functional-SAM with the preconditioned perturbation
        cls, kw = OPTIMIZERS["adamw"]
        return FunctionalSAM(model.parameters(), cls, rho=0.1, precondition=True, backend=backend, **kw)
    if name == "psam":  # the preconditioned perturbation: each rank reads its shards of exp_avg_sq
        cls, kw = OPTIMIZERS["adamw"]
        return FusedSAM(model.parameters(), cls, rho=0.1, precondition=True, backend=backend, **kw)
    if name.startswith("msam"):
        cls, kw = OPTIMIZERS[name.split("_")[1]]
        return MSAM(model.parameters(), cls, rho=0.5, backend=backend, **kw)
    cls, kw = OPTIMIZERS["sgd"]
    if name == "gsam":
        return GSAM(model.parameters(), cls, rho=0.1, alpha=0.4, backend=backend, **kw)
    return LookSAM(model.parameters(), cls, rho=0.1, k=2, alpha=0.7, backend=backend, **kw)


def run_efficient(rank, world, out: Path, backends):
    """GSAM and LookSAM (k 2: SAM steps and steps in between), Momentum-SAM, the preconditioned
    perturbation and Functional-SAM with it on FSDP2, through step(closure): their sums are all-reduced over the shards like
    the norm."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for backend in backends:
        for name in EFFICIENT:
            model = fsdp_model(mesh)
            universal_steps(model, make_efficient(model, name, backend), data(4), rank, world)
            params = [full(p).detach().clone() for p in model.parameters()]
            if rank == 0:
                torch.save(params, out / f"efficient_{backend}_{name}.pt")


def run_dcp(rank, world, out: Path, backend):
    """Train 2 steps, save model and optimizer with DCP, load into fresh ones, train 2 more; and
    the same 4 steps without interruption: FusedSAM (AdamW) and Momentum-SAM (SGD)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    batches = data(4)

    def sam():
        cls, kw = OPTIMIZERS["adamw"]
        return lambda model: FusedSAM(model.parameters(), cls, rho=0.1, backend=backend, **kw), sam_steps

    def msam():
        return lambda model: make_efficient(model, "msam_sgd", backend), universal_steps

    for name, (make, steps) in (("", sam()), ("msam_", msam())):
        results = []
        for resume in (False, True):
            model = fsdp_model(mesh)
            opt = make(model)
            if not resume:
                steps(model, opt, batches, rank, world)
            else:
                steps(model, opt, batches[:2], rank, world)
                path = str(out / f"ckpt_{name}{backend}")
                dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=path)
                model = fsdp_model(mesh)
                opt = make(model)
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                dcp.load(state, checkpoint_id=path)
                set_model_state_dict(model, state["model"])
                set_optimizer_state_dict(model, opt, state["optim"])
                steps(model, opt, batches[2:], rank, world)
            results.append(snapshot(model, opt))
        if rank == 0:
            torch.save(results, out / f"dcp_{name}{backend}.pt")


def main(rank: int, world: int, port: int, out: str, backends: list[str], universal_backends: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out_dir = Path(out)
        run_ddp(rank, world, out_dir)
        run_fsdp(rank, world, out_dir, backends)
        run_universal(rank, world, out_dir, universal_backends)
        run_efficient(rank, world, out_dir, backends)
        run_dcp(rank, world, out_dir, backends[-1])
        dist.barrier()  # every rank done before the group goes away
    finally:
        dist.destroy_process_group()
