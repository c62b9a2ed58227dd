"""Checks that only mean something on a CUDA device: no host sync, CUDA-graph capture.

The parity matrix of test_parity.py runs on CUDA too when a GPU is present (interpreter off).
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_TRITON
from sam_fused import FusedSAM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def _params(n=40):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [1, 97, 278011, 4096] * (n // 4)]


@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3)),
                                      (torch.optim.AdamW, dict(lr=1e-3, precondition=True))])
def test_no_host_sync_in_steps(base, kw):
    params = _params()
    opt = FusedSAM(params, base, rho=0.05, backend="triton", **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    opt.second_step()  # state allocated, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.first_step()
            opt.second_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_replay_matches_eager():
    """A whole SAM step (SGD with momentum) captured once and replayed equals eager steps."""
    eager, graphed = _params(), _params()
    grads = [torch.randn_like(p) for p in eager]
    opts = []
    for params in (eager, graphed):
        opt = FusedSAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="triton")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts.append(opt)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: state, tables, compilation
            for opt in opts:
                opt.first_step()
                opt.second_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[1].first_step()
        opts[1].second_step()
    for _ in range(3):
        opts[0].first_step()
        opts[0].second_step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


def test_native_cuda_backend_builds_on_a_gpu():
    """With a GPU and nvcc the native extension carries CUDA kernels, so the parity matrix of
    test_parity.py covers backend "cuda" as well as "triton"."""
    from sam_fused import available_backends

    assert {"triton", "cuda"} <= set(available_backends("cuda"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_of_a_whole_training_step_matches_eager(backend):
    """Forward, backward, first_step, forward, backward, second_step: captured once, replayed for
    several steps on new batches, equal to the same steps run eagerly (the README's recipe)."""
    from sam_fused import available_backends

    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable")
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()  # noqa: E731
    eager, graphed = make(), make()
    graphed.load_state_dict(eager.state_dict())
    batches = [(torch.randn(16, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")) for _ in range(5)]
    opts = [FusedSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
            for m in (eager, graphed)]
    loss_fn = torch.nn.functional.cross_entropy
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.second_step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:2]:  # warm-up: grads, state, tables, compiled kernels
            step(eager, opts[0], x, y)
            static_x.copy_(x)
            static_y.copy_(y)
            step(graphed, opts[1], static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, opts[1], static_x, static_y)
    for x, y in batches[2:]:
        step(eager, opts[0], x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_preconditioned_perturbation_on_cuda_equals_the_reference(monkeypatch, backend):
    """The fused preconditioned norm and perturb passes on CUDA (Triton, and the CUDA C++ kernels)
    against the torch reference, 4 steps; after the first step none runs in the reference ops."""
    from sam_fused.backends import available_backends, reference
    from tolerances import FP32

    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"the {backend} backend is not available here")
    calls = []
    real = reference.precondition_perturb
    monkeypatch.setattr(reference, "precondition_perturb", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for name in (backend, "torch"):
        params = _params(8)
        opt = FusedSAM(params, torch.optim.AdamW, rho=0.05, precondition=True, backend=name, lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(3)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            opt.first_step()
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            opt.second_step()
        runs.append([p.detach() for p in params])
        if name == backend:
            assert calls == [], f"{backend}: the preconditioned perturbation left the fused launches"
    atol, rtol = FP32["fast_vs_reference"]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
