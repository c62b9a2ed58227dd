#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the test suite with the Triton interpreter off (the
# parity matrices of the "triton" and "cuda" backends, tests/test_gpu.py), then the benchmark on
# the default models, at >= 100M parameters, with ~1000 small tensors, with AdamW, and with the
# universal SAM class. Logs and JSON go to $OUT (or ./gpu-results), named after the GPU.
#
#   bash benchmarks/gpu_run.sh            # on a machine with a CUDA GPU, torch, triton, nvcc, ninja
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
python3 - <<'PY' | tee "$out/environment.txt"
import torch, triton
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
PY
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
day=$(date -u +%Y-%m-%d)
python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$out/tests.log"
# the roofline (each pass alone, up to 1B parameters) once, in the first run
for args in "" "--base adamw --no-roofline" "--model many-small --no-train --no-roofline" "--model transformer --transformer-params 2e8 --no-train --no-roofline" "--universal --model resnet --no-roofline"; do
  name=$(echo "bench $args" | tr -s ' -' '_' | sed 's/_$//')
  python3 -m sam_fused bench $args --json "$out/$name-$gpu-$day.json" 2>/dev/null | tee "$out/$name.txt"
done
python3 -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only 2>&1 | tee "$out/pytest-benchmark.log"
