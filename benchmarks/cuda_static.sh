#!/usr/bin/env bash
# The CUDA C++ kernels' static report: csrc/sam_cuda.cu compiled with nvcc for each architecture,
# ptxas -v's registers, stack and spills per kernel (no GPU needed). Skips cleanly without nvcc
# or for an architecture this nvcc does not know.
#
#   bash benchmarks/cuda_static.sh [archs]      # default: 80 89 90 100
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then echo "nvcc not found: CUDA C++ static check skipped"; exit 0; fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
incs=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
pyinc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
status=0
for arch in ${1:-80 89 90 100}; do
  if ! nvcc --list-gpu-arch 2>/dev/null | grep -qx "compute_$arch"; then echo "sm_$arch: skipped (nvcc $(nvcc --version | tail -1) does not know it)"; continue; fi
  if ! nvcc -std=c++17 -O3 -gencode arch=compute_$arch,code=sm_$arch -Xptxas -v $incs -I"$pyinc" -Icsrc \
      -c csrc/sam_cuda.cu -o "$out/k.o" > "$out/log" 2>&1; then
    echo "sm_$arch: nvcc failed"; tail -20 "$out/log"; status=1; continue
  fi
  # one line per kernel: registers, stack, spills
  awk -v arch="sm_$arch" '/Compiling entry function/ {name=$0; sub(/.*function .*_Z[0-9]*/, "", name); sub(/.for .*/, "", name); name=substr(name, 1, 60)}
       /bytes stack frame/ {frame=$0}
       /Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/); r=substr($0, RSTART+5, RLENGTH-15);
         match(frame, /[0-9]+ bytes spill stores/); s=substr(frame, RSTART, RLENGTH);
         printf "%-8s %-62s regs %4s  %s\n", arch, name, r, s}' "$out/log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/log" >/dev/null; then echo "sm_$arch: SPILLS"; status=1; fi
done
rm -rf "$out"
exit $status
