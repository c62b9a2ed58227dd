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


@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))])
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
