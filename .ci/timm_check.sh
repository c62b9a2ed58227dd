#!/usr/bin/env bash
# The timm integration's tests (tests/test_timm.py) in a second environment: timm imports torchvision,
# and PyPI's torchvision does not load beside the CPU torch 2.13.0 of `make test`; torch 2.14.1 with
# torchvision 0.29.1 does (a CUDA build, run here on the CPU). The checkout's sam_fused is imported
# from the working tree, as `make test` does.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31" pytest numpy 2>&1 \
  | grep -v "^WARNING: Location" || true
"$tmp/venv/bin/python" -c "import torch, torchvision, timm; print('timm check:', 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'timm', timm.__version__)"
"$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_timm.py
