"""torch.compile around a training step: the SAM steps give the eager result on every backend
(they run eagerly inside a compiled function: a graph break), never a silent divergence."""

from __future__ import annotations

import pytest
import torch

from sam_fused import FrobSAM, FusedSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def run(backend: str, compiled: bool, lr: float):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 300)]
    opt = FusedSAM(params, torch.optim.SGD, lr=lr, momentum=0.9, rho=0.5, backend=backend)

    def steps(g1, g2):
        for p, g in zip(params, g1):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, g2):
            p.grad = g
        opt.second_step()

    fn = torch.compile(steps) if compiled else steps
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        fn(*[[torch.randn(p.shape, generator=gen).to(DEVICE) for p in params] for _ in range(2)])
    return [p.detach().clone() for p in params]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("lr", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_steps_equal_eager(backend, lr):
    torch._dynamo.reset()
    eager, compiled = run(backend, False, lr), run(backend, True, lr)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    if lr == 0.0:  # the weights come back exactly: the perturbation never sticks
        torch.manual_seed(0)
        for p, w in zip(compiled, [torch.randn(n, device=DEVICE) for n in (5, 300)]):
            assert torch.equal(p, w)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_universal_step_equals_eager():
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).to(DEVICE)
        x, y = torch.randn(8, 4, device=DEVICE), torch.randn(8, 2, device=DEVICE)
        opt = FrobSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=0, backend="torch")

        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        def step():
            opt.zero_grad()
            return opt.step(closure)

        fn = torch.compile(step) if compiled else step
        for _ in range(2):
            fn()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
