#!/usr/bin/env bash
# One short GPU session (a lent machine with torch, triton, nvcc and ninja; nothing to install):
#   1. the native CUDA extension's build (about 90 s of nvcc);
#   2. the efficient-SAM training bench (GSAM, LookSAM, interval, RST next to SAM and SGD) and the
#      optimizer-step table on a 50M-parameter transformer (Triton and CUDA backends);
#   3. the kernel test files with the interpreter off: Triton and CUDA parity of SAM, GSAM, LookSAM,
#      AMP, the steady-state/no-sync/CUDA-graph checks.
# Everything goes to $OUT (or ./gpu-results); the last lines are a summary.
#
#   SAM_FUSED_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh [test seconds] [bench seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 MAX_JOBS=16
unset TRITON_INTERPRET
python3 -c "import torch, triton; print('gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)" | tee "$out/environment.txt"
echo "commit: ${SAM_FUSED_COMMIT:-unknown}" >> "$out/environment.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/environment.txt"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
day=$(date -u +%Y-%m-%d)
/usr/bin/time -f "native build: %e s" python3 -c "from sam_fused.native import load; load()" > "$out/build.log" 2>&1
tail -1 "$out/build.log"
timeout "${2:-130}" python3 -m sam_fused bench --model transformer --transformer-params 5e7 --efficient \
  --host-tensors 100,1000 --steps 15 --json "$out/bench-efficient-$gpu-$day.json" > "$out/bench-efficient.txt" 2>&1
echo "bench rc=$?"
timeout "${1:-100}" python3 -m pytest -q -p no:cacheprovider --timeout 90 --maxfail=20 \
  tests/test_gpu.py tests/test_gsam_looksam.py tests/test_plan.py tests/test_parity.py tests/test_amp.py \
  > "$out/tests.log" 2>&1
echo "tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -25
grep -A9 "^Optimizer step alone" "$out/bench-efficient.txt"
grep -A13 "^Training" "$out/bench-efficient.txt" | head -30
