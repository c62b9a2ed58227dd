"""`import sam_fused` and `sam-fused --help` load no more of torch than `import torch` does: not
torch.distributed.tensor (with sympy) nor torch._dynamo, ~0.7 s together, which the first step of
a DTensor (FSDP2) or compiled program loads when it needs them. Measured by what
`python -X importtime` lists, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch.distributed.tensor", "sympy", "torch._dynamo")


def _imported(*args: str) -> set[str]:
    """The modules a fresh ``python -X importtime *args`` imports (this checkout's sam_fused)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCH_LOGS", None)  # torch's logging setup would import torch._dynamo
    run = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture(scope="module")
def torch_alone() -> set[str]:
    return _imported("-c", "import torch")


@pytest.mark.parametrize("what", [
    ("-c", "import sam_fused"),
    ("-c", "from sam_fused import " + ", ".join(__import__("sam_fused").__all__)),
    ("-m", "sam_fused", "--help"),
], ids=["import", "public-names", "cli-help"])
def test_no_heavy_imports_beyond_torchs(what, torch_alone):
    got = _imported(*what)
    assert "sam_fused" in got
    extra = [m for m in HEAVY if m in got and m not in torch_alone]
    assert not extra, f"{' '.join(what)} imports {extra}, which `import torch` does not"


def test_steps_run_eagerly_under_compile_from_a_fresh_process():
    """The steps' torch.compiler.disable is made when the first optimizer is built (torch's own
    Optimizer loads torch._dynamo there), not at import: a step first called inside a compiled
    function runs eagerly, with no graph break of its own, and gives the eager result."""
    code = """
import sys, torch
from sam_fused import FusedSAM
assert "torch._dynamo" not in sys.modules
def run(compiled):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 30)]
    opt = FusedSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.5, backend="torch")
    def steps(g):
        for p in params:
            p.grad = g * p.detach()
        opt.first_step()
        for p in params:
            p.grad = g * p.detach() + 1
        opt.second_step()
    gs = [2.0, 3.0, 0.5]
    if compiled:  # explain runs the first step
        reasons = [str(b.reason) for b in torch._dynamo.explain(steps)(torch.tensor(gs.pop(0))).break_reasons]
        # the two steps' own breaks (they run eagerly), nothing else (no traced call of disable)
        assert len(reasons) <= 2 and all("first_step" in r or "second_step" in r for r in reasons), reasons
        torch._dynamo.reset()
        steps = torch.compile(steps)
    for g in gs:
        steps(torch.tensor(g))
    return [p.detach() for p in params]
assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCH_LOGS", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
