#!/usr/bin/env bash
# The install a user makes into their own project: build the wheel, install it into a fresh virtual
# environment without the dev extras (torch 2.13.0 first, as the Makefile does, so the package's
# range installs nothing more), and run one CPU training step from outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" . 2>&1 | grep -v "^WARNING: Location" || true
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/sam_fused-*.whl 2>&1 | grep -v "^WARNING: Location" || true
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import pathlib, sys, torch
import sam_fused
from sam_fused import FusedSAM, available_backends
assert "site-packages" in sam_fused.__file__, sam_fused.__file__
assert (pathlib.Path(sam_fused.__file__).parent / "_csrc" / "sam_cpu.cpp").exists(), "the wheel lacks the C++ sources"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
loss = lambda: torch.nn.functional.cross_entropy(model(x), y)
before = loss().item()
for _ in range(5):
    def closure():
        l = loss()
        l.backward()
        return l
    opt.zero_grad()
    opt.step(closure)
after = loss().item()
assert after < before, (before, after)
print(f"wheel check: sam_fused {sam_fused.__version__} from {sam_fused.__file__}, backend {opt.backend!r} "
      f"(available: {available_backends('cpu')}), loss {before:.4f} -> {after:.4f}, torch {torch.__version__}")
PY
