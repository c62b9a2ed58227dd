#!/usr/bin/env bash
# One device run (fits 8 minutes of device time with the machine's start), everything to $OUT (or
# ./gpu-results), at most 8 files:
#   1. tests.log      the GPU test files with the interpreter off, failing fast (environment first);
#   2. sweep.log/.json the launch-configuration candidates per pass at 64M and 256M parameters and
#                     on the transformer and LLM mixes, each timed against the same run's copy
#                     (medians with quartiles; sam_fused/tools/bench/sweep.py);
#   3. launch_configs.json  the winning table, in the committed file's format, under the GPU's name;
#   4. bench.txt/.json the roofline and host rows re-run with the winning table;
#   5. ncu.txt        Nsight Compute on the best and the worst pass (DRAM throughput, achieved
#                     occupancy, warp stall reasons), time-capped;
#   6. summary.txt    what ran, each step's exit status and time.
#
#   bash benchmarks/gpu_run.sh                        # on a machine with a CUDA GPU, torch, triton
#   SAM_FUSED_REHEARSAL=1 bash benchmarks/gpu_run.sh  # the same steps on the CPU, tiny, no ncu
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
rehearsal=${SAM_FUSED_REHEARSAL:-0}
if [ "$rehearsal" = 1 ]; then
  export TRITON_INTERPRET=1
  T_TESTS=${T_TESTS:-120} T_SWEEP=${T_SWEEP:-240} T_BENCH=${T_BENCH:-120} T_NCU=0
  tests=(tests/test_launch_configs.py -k "committed or bad_table")
  sweep_args=(--tiny --max-candidates 2 --reps 2 --warmup 1)
  bench_args=(--device cpu --backend triton --model resnet --no-train --roofline --roofline-sizes 20000 --roofline-mixes none
              --roofline-dtypes float32 --host-tensors 10 --steps 2 --warmup 1)
else
  unset TRITON_INTERPRET
  # caps: 100 + 180 + 60 + 2 x 25 s = 6.5 minutes, with the machine's start about 8
  T_TESTS=${T_TESTS:-100} T_SWEEP=${T_SWEEP:-180} T_BENCH=${T_BENCH:-60} T_NCU=${T_NCU:-25}
  # the Triton kernels compiled: every launch configuration, no host sync, CUDA graphs, the parity
  # and Momentum-SAM matrices; the native build (about 90 s of nvcc) left out of this run
  export SAM_FUSED_NATIVE=0
  tests=(tests/test_launch_configs.py tests/test_gpu.py tests/test_parity.py tests/test_msam.py
         --deselect tests/test_gpu.py::test_native_cuda_backend_builds_on_a_gpu)
  sweep_args=()
  bench_args=(--model transformer --no-train --backend triton --roofline --roofline-sizes 6.4e7,2.56e8
              --roofline-mixes transformer,llm --roofline-dtypes float32 --host-tensors 100,1000 --steps 10)
fi
summary="$out/summary.txt"
: > "$summary"
step() {  # step NAME SECONDS CMD...: run with a time cap, record status and time
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  timeout "$cap" "$@"
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 )) s (cap $cap s)" | tee -a "$summary"
  return $rc
}
{
  $PY -c "import torch, triton; d = torch.cuda.is_available(); print('gpu:', torch.cuda.get_device_name(0) if d else 'none (rehearsal)', '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "commit: ${SAM_FUSED_COMMIT:-unknown}"
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>/dev/null || true
} > "$out/tests.log" 2>&1
# 1. tests, fail fast
step tests "$T_TESTS" $PY -m pytest -q -x -p no:cacheprovider "${tests[@]}" >> "$out/tests.log" 2>&1
tail -3 "$out/tests.log"
# 2. sweep -> sweep.json, launch_configs.json
step sweep "$T_SWEEP" $PY -m sam_fused.tools.bench.sweep --out "$out" "${sweep_args[@]}" > "$out/sweep.log" 2>&1
tail -12 "$out/sweep.log"
# 3. the bench with the winning table (the committed one if the sweep left none)
table="$out/launch_configs.json"
[ -f "$table" ] || table=sam_fused/kernels/launch_configs.json
SAM_FUSED_LAUNCH_CONFIGS="$table" step bench "$T_BENCH" $PY -m sam_fused bench "${bench_args[@]}" \
  --json "$out/bench.json" > "$out/bench.txt" 2>&1
grep -A14 -i "roofline" "$out/bench.txt" | head -30
# 4. ncu on the best and worst pass (the largest shape's rows under the winners)
if [ "$T_NCU" != 0 ] && command -v ncu >/dev/null && [ -f "$out/sweep.json" ]; then
  picks=$($PY - "$out/sweep.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
big = max(r["params"] for r in rows if r["shape"] == "1 tensor")
best = {}
for r in rows:
    if r["params"] == big and r["shape"] == "1 tensor":
        if r["group"] not in best or r["fraction_of_copy"] > best[r["group"]]["fraction_of_copy"]:
            best[r["group"]] = r
order = sorted(best.values(), key=lambda r: r["fraction_of_copy"])
for r in (order[-1], order[0]):
    print(r["group"] + "\t" + json.dumps(r["config"]))
PY
)
  : > "$out/ncu.txt"
  while IFS=$'\t' read -r group cfg; do
    echo "== $group $cfg" >> "$out/ncu.txt"
    step "ncu $group" "$T_NCU" ncu --clock-control none --profile-from-start off -c 3 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
      $PY benchmarks/ncu_pass.py "$group" "$cfg" >> "$out/ncu.txt" 2>&1
  done <<< "$picks"
  grep -E "^== |DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|stalled|Warp Cycles Per Issued" "$out/ncu.txt" | head -40
else
  echo "ncu: skipped ($( [ "$T_NCU" = 0 ] && echo rehearsal || echo 'no ncu or no sweep.json'))" | tee -a "$summary"
fi
echo "--- summary"; cat "$summary"
