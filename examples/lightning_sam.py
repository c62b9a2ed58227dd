"""FusedSAM in PyTorch Lightning, manual optimization, with an LR scheduler.

Run: ``python examples/lightning_sam.py`` (needs ``pip install lightning``; CPU is enough).

Two ways to write the training step, both giving the same weights as a hand-written loop:

* ``"closure"``: ``opt.step(closure)``: FusedSAM calls the closure twice (at w, then at w + e);
* ``"manual"``: ``first_step`` / ``second_step`` on ``self.optimizers()``, as with davda54's SAM.

Neither makes the scheduler warn that it stepped before the optimizer.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F

from sam_fused import FusedSAM


def make_data(seed: int = 0, n: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def make_optimizer(params, backend: str | None = None):
    opt = FusedSAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)


class SAMModule(L.LightningModule):
    def __init__(self, mode: str = "closure", backend: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False  # SAM needs two backward passes per step
        self.mode, self.backend = mode, backend
        self.net = make_net(seed)
        self.closure_calls = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.mode == "closure":
            def closure():
                self.closure_calls += 1
                loss = F.cross_entropy(self.net(x), y)
                opt.zero_grad()
                self.manual_backward(loss)
                return loss

            loss = opt.step(closure)
        else:
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            opt.first_step(zero_grad=True)
            self.manual_backward(F.cross_entropy(self.net(x), y))
            opt.second_step(zero_grad=True)
        self.log("loss", loss.detach(), prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.parameters(), self.backend)
        return [opt], [sched]


def train(mode: str = "closure", epochs: int = 2, backend: str | None = None, seed: int = 0) -> SAMModule:
    module = SAMModule(mode, backend, seed)
    loader = torch.utils.data.DataLoader(make_data(seed), batch_size=32)
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, loader)
    return module


def train_by_hand(epochs: int = 2, backend: str | None = None, seed: int = 0) -> torch.nn.Module:
    """The same training as a plain loop: what the Lightning runs must equal."""
    net = make_net(seed)
    opt, sched = make_optimizer(net.parameters(), backend)
    for _ in range(epochs):
        for x, y in torch.utils.data.DataLoader(make_data(seed), batch_size=32):
            F.cross_entropy(net(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(net(x), y).backward()
            opt.second_step(zero_grad=True)
        sched.step()
    return net


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["closure", "manual"], default="closure")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    module = train(args.mode, args.epochs)
    ref = train_by_hand(args.epochs)
    same = all(torch.equal(a, b) for a, b in zip(module.net.parameters(), ref.parameters()))
    print(f"{args.mode}: weights equal to the hand-written loop: {same}")
