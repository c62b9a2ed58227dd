"""Writes ``checkpoints_v1.pt``: state dicts of every SAM optimizer as this package saved them before
its backends were reorganized (FusedSAM, ASAM, interval SAM, GSAM, LookSAM, MSAM over SGD and
AdamW, Frob-SAM), each after 3 steps of a small MLP, with the weights then and the weights after
one more step. ``tests/test_checkpoints.py`` loads each into today's optimizers and checks the next
step. Run with an older checkout first on ``PYTHONPATH``:

    PYTHONPATH=/path/to/old/checkout python tests/data/make_checkpoints.py tests/data/checkpoints_v1.pt
"""

from __future__ import annotations

import copy
import sys

import torch

import sam_fused


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


CASES = {
    "sam_sgd": (sam_fused.FusedSAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)),
    "asam_adamw": (sam_fused.FusedSAM, dict(base_optimizer=torch.optim.AdamW, rho=0.5, adaptive=True, lr=1e-2)),
    "interval_sgd": (sam_fused.FusedSAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, interval=2, lr=0.1,
                                              momentum=0.9)),
    "gsam_sgd": (sam_fused.GSAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9)),
    "looksam_sgd": (sam_fused.LookSAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, k=2, alpha=0.7, lr=0.1,
                                            momentum=0.9)),
    "msam_sgd": (sam_fused.MSAM, dict(base_optimizer=torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)),
    "msam_adamw": (sam_fused.MSAM, dict(base_optimizer=torch.optim.AdamW, rho=0.3, lr=1e-2)),
    "frob_sgd": (sam_fused.FrobSAM, dict(base_optimizer=torch.optim.SGD, rho=0.05, seed=3, lr=0.1, momentum=0.9)),
}


def step(opt, net, k: int) -> None:
    x, y = batch(k)

    def closure():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)


def run(name: str, backend: str, steps: int = 3):
    cls, kw = CASES[name]
    net = model()
    opt = cls(net.parameters(), backend=backend, **kw)
    for k in range(steps):
        step(opt, net, k)
    return net, opt


def main(path: str) -> None:
    out = {"version": sam_fused.__version__, "cases": {}}
    for name in CASES:
        net, opt = run(name, "torch")
        saved = {"state_dict": copy.deepcopy(opt.state_dict()), "weights": [p.detach().clone() for p in net.parameters()]}
        step(opt, net, 3)
        saved["after"] = [p.detach().clone() for p in net.parameters()]
        out["cases"][name] = saved
    torch.save(out, path)


if __name__ == "__main__":
    main(sys.argv[1])
