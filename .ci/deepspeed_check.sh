#!/usr/bin/env bash
# The DeepSpeed integration's tests (tests/test_deepspeed.py) in a second environment, so that the
# environment of `make test` keeps only what it lists: torch 2.13.0 first, then DeepSpeed 0.19.8 with
# DS_BUILD_OPS=0 (it compiles none of its ops and keeps that torch), then the package with its
# deepspeed and transformers extras, accelerate (SAMTrainer on DeepSpeed) and pytest. The tests run 2
# CPU processes over gloo; the checkout's sam_fused is
# imported from the working tree, as `make test` does.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q)
{ "${pip[@]}" "torch==2.13.0"
  DS_BUILD_OPS=0 "${pip[@]}" "deepspeed==0.19.8" "torch==2.13.0"  # DeepSpeedSAM's TESTED_VERSIONS
  "${pip[@]}" -e ".[deepspeed,transformers]" "accelerate>=0.30" "pytest>=7"; } 2>&1 | grep -v "^WARNING: Location" || true
"$tmp/venv/bin/python" -c "import torch, deepspeed; assert torch.__version__.startswith('2.13.0'), torch.__version__; \
print('deepspeed check:', 'torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
"$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_deepspeed.py
