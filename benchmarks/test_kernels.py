"""pytest-benchmark suite for one SAM optimizer step (first_step + second_step, no forward/backward).

    pytest benchmarks/ --benchmark-only

Separate from tests/ so the test suite stays fast. On a GPU it times every backend on CUDA; on
the CPU it times the reference and the per-parameter baseline (the Triton interpreter is a test
tool, not a backend to time). For the roofline view use ``sam-fused bench``.
"""

from __future__ import annotations

import pytest
import torch

from sam_fused import FusedSAM
from sam_fused.tools.bench.baseline import PerParameterSAM

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", "triton"] if CUDA else ["torch"]
# (tensors, elements each): many small tensors (launch-bound) and a few large ones (bandwidth-bound)
SHAPES = {"1000x4k": (1000, 4096), "20x1M": (20, 1 << 20)} if not CUDA else {"1000x4k": (1000, 4096), "200x512k": (200, 1 << 19)}


def _params(n, size):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(size, generator=gen).to(DEVICE)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(size, generator=gen).to(DEVICE)
    return ps


def _bench(benchmark, opt):
    def step():
        opt.first_step()
        opt.second_step()
        if CUDA:
            torch.cuda.synchronize()

    step()
    benchmark(step)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sam_step(benchmark, backend, shape):
    ps = _params(*SHAPES[shape])
    _bench(benchmark, FusedSAM(ps, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, backend=backend))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_per_parameter_baseline_step(benchmark, shape):
    ps = _params(*SHAPES[shape])
    _bench(benchmark, PerParameterSAM(ps, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9))
