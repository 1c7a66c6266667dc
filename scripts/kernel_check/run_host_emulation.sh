#!/usr/bin/env bash
# Runs the CUDA device code (csrc/kernels/*.cuh: the LayerNorm and LN-RNN cell kernels)
# on the CPU: one std::thread per CUDA thread, barriers, warp shuffles and thread-block
# clusters emulated (emu_runtime.h, through csrc/kernels/platform.cuh: the kernel
# sources are compiled as they are), checked against a float64 / long double reference
# (see test_emu.cpp). No GPU needed; a development check of index math, barriers,
# shuffles and numerics, not a substitute for the CUDA tests on a GPU (no memory model,
# no real warps, no fused multiply-add).
#   run_host_emulation.sh [--tsan] [MODE]
#     MODE: (none)  N in 1..1025, M in {1, 3, 37}, every kernel   (~20 min on 2 cores)
#           big     N in 2047..16385, M in {1, 3}
#           q       a few shapes of every kernel, a few minutes
#           t       every kernel family once (float, bf16): for --tsan
#           n N...  the given N, M = 2, bf16 and f16/f32 mixed LayerNorm only
#     --tsan: ThreadSanitizer instead of AddressSanitizer: a shared-memory access that
#             races with another thread's (no barrier between) is reported and fails the run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
sanitizer=address
if [[ "${1:-}" == "--tsan" ]]; then
  sanitizer=thread
  shift
fi
# The binary is cached under build/kernel_check by the hash of everything it is built from
# (the emulation, the device code it includes, the compiler and its flags): a second run,
# or the ASan and TSan runs of one `make check`, skip the minute of compiling.
flags=(-std=c++20 -O1 -g -w -fsanitize="$sanitizer" -DLN_EXT_HOST_EMULATION
       -I"${CUDA_HOME:-/usr/local/cuda}/include" -I"$here" -I"$root/csrc")
key=$( { cat "$here"/test_emu.cpp "$here"/emu_runtime.h "$root"/csrc/kernels/*.cuh; g++ --version; echo "${flags[*]}"; } \
      | sha256sum | cut -c1-16)
cache="$root/build/kernel_check"
binary="$cache/test_emu-$sanitizer-$key"
if [[ ! -x "$binary" ]]; then
  mkdir -p "$cache"
  rm -f "$cache/test_emu-$sanitizer-"*  # older builds of this sanitizer
  g++ "${flags[@]}" "$here/test_emu.cpp" -o "$binary.tmp.$$" -lpthread
  mv "$binary.tmp.$$" "$binary"
fi
# TSan: report every race (not only the first per location pair) and fail on any.
TSAN_OPTIONS="halt_on_error=0 exitcode=66 ${TSAN_OPTIONS:-}" "$binary" "$@"
