#!/usr/bin/env bash
# The CUDA C++ kernels' static report: csrc/sam_cuda.cu compiled with nvcc for each architecture,
# ptxas -v's registers and spills (no GPU needed): per architecture, the kernels' register range
# and the bytes spilled (any spill fails). Skips cleanly without nvcc
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
# a CPU build of torch ships the c10/cuda headers without their generated cuda_cmake_macros.h:
# a stand-in with the one definition a shared-library build generates, for this compile only
if ! $PY -c "import os, sys; from torch.utils.cpp_extension import include_paths; sys.exit(not os.path.exists(os.path.join(include_paths()[0], 'c10/cuda/impl/cuda_cmake_macros.h')))"; then
  mkdir -p "$out/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/inc/c10/cuda/impl/cuda_cmake_macros.h"
  incs="-I$out/inc $incs"
  echo "(torch is a CPU build: a stand-in for c10/cuda/impl/cuda_cmake_macros.h)"
fi
for arch in ${1:-80 89 90 100}; do
  if ! nvcc --list-gpu-arch 2>/dev/null | grep -qx "compute_$arch"; then echo "sm_$arch: skipped (nvcc $(nvcc --version | tail -1) does not know it)"; continue; fi
  if ! nvcc -std=c++17 -O3 -gencode arch=compute_$arch,code=sm_$arch -Xptxas -v $incs -I"$pyinc" -Icsrc \
      -c csrc/sam_cuda.cu -o "$out/k.o" > "$out/log" 2>&1; then
    echo "sm_$arch: nvcc failed"; tail -20 "$out/log"; status=1; continue
  fi
  # per architecture: kernels, their register range and spilled bytes (ptxas -v)
  awk -v arch="sm_$arch" '/Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/); r=substr($0, RSTART+5, RLENGTH-15) + 0;
         n++; if (n == 1 || r < lo) lo = r; if (r > hi) hi = r}
       /bytes spill stores/ {match($0, /[0-9]+ bytes spill stores/); sp += substr($0, RSTART, RLENGTH) + 0}
       END {printf "%-7s %3d kernels, %d-%d registers per thread, %d bytes spilled\n", arch, n, lo, hi, sp}' "$out/log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/log" >/dev/null; then echo "sm_$arch: SPILLS"; status=1; fi
done
rm -rf "$out"
exit $status
