#!/usr/bin/env bash
# The install a user makes into their own project: build the wheel, install it into a fresh virtual
# environment without extras (torch 2.13.0 first, as the Makefile does, so the package's range
# installs nothing more), check that it pulled no triton (torch's CUDA wheels bring their own; a CPU
# torch does not), and run CPU training steps from outside the checkout: backend=None (the native
# kernels, built from the wheel's sources into a throwaway extension folder) and backend="triton"
# refused with its cause.
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
TORCH_EXTENSIONS_DIR="$tmp/torch_extensions" "$tmp/venv/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import pathlib, re, sys, torch

def name(req):
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower()

torch_brings_triton = any(name(r) == "triton" for r in md.requires("torch") or [])
for req in md.requires("sam_fused") or []:
    assert name(req) != "triton" or "extra ==" in req, f"sam_fused requires {req!r} without an extra"
if not torch_brings_triton:
    assert importlib.util.find_spec("triton") is None, "the install without extras pulled triton"
import sam_fused
from sam_fused import BackendUnavailable, FusedSAM, available_backends
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
if importlib.util.find_spec("triton") is None:
    try:
        FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend="triton")
        raise AssertionError("backend='triton' without triton did not raise")
    except BackendUnavailable as exc:
        assert "triton" in str(exc.__cause__), exc
triton = "none" if importlib.util.find_spec("triton") is None else md.version("triton")
print(f"wheel check: sam_fused {sam_fused.__version__} from {sam_fused.__file__}, backend {opt.backend!r} "
      f"(available: {available_backends('cpu')}), loss {before:.4f} -> {after:.4f}, torch {torch.__version__}, "
      f"triton {triton}")
PY
