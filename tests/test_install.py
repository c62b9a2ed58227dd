"""What an install brings: triton only with the `triton` and `dev` extras (torch's CUDA wheels bring
their own), and sam_fused works without it: backend=None picks another backend, backend="triton"
says why it cannot run. (.ci/wheel_check.sh installs the wheel into a fresh environment and checks
that no triton came with it.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def test_triton_comes_only_with_the_triton_and_dev_extras():
    deps, extras = _requirements()
    assert "triton" not in _names(deps)  # a CPU-only install pulls no 1 GB of unused triton
    assert "triton" in _names(extras["triton"])
    assert "triton" in _names(extras["dev"])  # the tests run the Triton kernels through its interpreter


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed: importing it raises ImportError
import torch
import sam_fused
from sam_fused import BackendUnavailable, FrobSAM, FusedSAM, available_backends
assert "triton" not in available_backends("cpu"), available_backends("cpu")
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
x, y = torch.randn(16, 4), torch.randn(16, 2)
def closure():
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss
for cls in (FusedSAM, FrobSAM):
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend in ("cpu", "torch"), opt.backend
    before = closure().item()
    opt.zero_grad()
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    assert closure().item() < before
    try:
        cls(model.parameters(), torch.optim.SGD, lr=0.1, backend="triton")
    except BackendUnavailable as exc:
        assert "backend 'triton' cannot load" in str(exc) and "triton" in str(exc.__cause__), exc
    else:
        raise AssertionError("backend='triton' without triton did not raise")
print("ok", opt.backend)
"""


def test_works_without_triton():
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAM_FUSED_NATIVE="0", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok torch")
