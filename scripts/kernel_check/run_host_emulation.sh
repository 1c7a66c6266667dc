#!/usr/bin/env bash
# Runs the CUDA LayerNorm device code (csrc/kernels/*.cuh) on the CPU: one
# std::thread per CUDA thread, barriers and warp shuffles emulated, built with
# AddressSanitizer, checked against a float64 reference (see test_emu.cpp).
# No GPU needed; a development check of index math, barriers and shuffles, not
# a substitute for the CUDA tests on a GPU (no memory model, no real warps).
#   run_host_emulation.sh          N in 1..1025, M in {1, 3, 37}   (~10 min on 2 cores)
#   run_host_emulation.sh big      N in 2047..16385, M in {1, 3}
#   run_host_emulation.sh q        4 shapes, about a minute
#   run_host_emulation.sh n N...   the given N, M = 2, bf16 and f16/f32 mixed only
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/kernels"
# Host C++ has no __shared__ or dynamic shared memory: make them static / a host buffer
# per block, clusters emulated (emu_runtime.h), and check the alignment of every 16-byte access.
for f in "$root"/csrc/kernels/*.cuh; do
  sed -e 's/extern __shared__ uint4 dynamic_smem\[\];/uint4* dynamic_smem = emu::dynamic_smem();/' \
      -e 's/__shared__/static/' \
      -e 's/cooperative_groups::this_cluster()/emu::this_cluster()/' \
      -e '/#include <cooperative_groups.h>/d' \
      -e 's/const uint4\* s = reinterpret_cast<const uint4\*>(src);/& EMU_CHECK_ALIGN(src); EMU_CHECK_ALIGN(dst);/' \
      "$f" > "$work/kernels/$(basename "$f")"
done
cp "$here/emu_runtime.h" "$here/test_emu.cpp" "$work/"
g++ -std=c++20 -O1 -g -w -fsanitize=address -I"${CUDA_HOME:-/usr/local/cuda}/include" -I"$work" \
    "$work/test_emu.cpp" -o "$work/test_emu" -lpthread
"$work/test_emu" "$@"
