"""FusedSAM with Hugging Face accelerate.

Run: ``python examples/accelerate_sam.py`` (needs ``pip install accelerate``; CPU is enough, or
``accelerate launch examples/accelerate_sam.py`` on several GPUs).

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which forwards
``step``, ``zero_grad`` and the state, but not SAM's own methods: use ``optimizer.step(closure)``
(FusedSAM calls the closure twice), or ``first_step`` / ``second_step`` on ``optimizer.optimizer``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sam_fused import FusedSAM


def make_data(seed: int = 0, n: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def train(mode: str = "closure", epochs: int = 2, backend: str | None = None, seed: int = 0, cpu: bool = False):
    accelerator = Accelerator(cpu=cpu)
    net = make_net(seed)
    opt = FusedSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    loader = torch.utils.data.DataLoader(make_data(seed), batch_size=32)
    net, opt, loader = accelerator.prepare(net, opt, loader)
    for _ in range(epochs):
        for x, y in loader:
            if mode == "closure":
                def closure():
                    loss = F.cross_entropy(net(x), y)
                    accelerator.backward(loss)
                    return loss

                opt.zero_grad()
                opt.step(closure)
            else:
                sam = opt.optimizer  # the FusedSAM inside the AcceleratedOptimizer
                accelerator.backward(F.cross_entropy(net(x), y))
                sam.first_step(zero_grad=True)
                accelerator.backward(F.cross_entropy(net(x), y))
                sam.second_step(zero_grad=True)
    return accelerator.unwrap_model(net)


def train_by_hand(epochs: int = 2, backend: str | None = None, seed: int = 0) -> torch.nn.Module:
    net = make_net(seed)
    opt = FusedSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    for _ in range(epochs):
        for x, y in torch.utils.data.DataLoader(make_data(seed), batch_size=32):
            F.cross_entropy(net(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(net(x), y).backward()
            opt.second_step(zero_grad=True)
    return net


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["closure", "manual"], default="closure")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    net = train(args.mode, args.epochs, cpu=not torch.cuda.is_available())
    ref = train_by_hand(args.epochs)
    same = all(torch.equal(a.cpu(), b) for a, b in zip(net.parameters(), ref.parameters()))
    print(f"{args.mode}: weights equal to the hand-written loop: {same}")
