// Host emulation of the few CUDA device features the ln_ext kernels use: one
// std::thread per CUDA thread, a block's threads run together, blocks one after another.
#pragma once
#include <vector_types.h>
#define __launch_bounds__(...)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim { unsigned x = 1, y = 1, z = 1; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;
inline thread_local std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline std::vector<double> emu_warp_slots;  // [warps * 32]
inline std::vector<uint4> emu_dynamic_smem_buf;

namespace emu {
inline uint4* dynamic_smem() { return emu_dynamic_smem_buf.data(); }
}

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  assert(mask == 0xffffffffu);
  emu_warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}

template <typename A>
A __shfl_xor_sync(unsigned mask, A v, int offset) {
  assert(mask == 0xffffffffu);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu_warp_slots[warp * 32 + lane] = static_cast<double>(v);
  emu_warp_barriers[warp]->arrive_and_wait();
  const A r = static_cast<A>(emu_warp_slots[warp * 32 + (lane ^ offset)]);
  emu_warp_barriers[warp]->arrive_and_wait();
  return r;
}

#define EMU_CHECK_ALIGN(p)                                                          \
  do {                                                                              \
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {                                 \
      std::fprintf(stderr, "misaligned 16-byte access at %p\n", (const void*)(p)); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

inline void emu_launch(EmuDim grid, EmuDim block, size_t smem_bytes, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y;
  assert(threads % 32 == 0 && threads <= 1024);
  emu_dynamic_smem_buf.assign(smem_bytes / 16 + 1, uint4{0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu});
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(threads);
      emu_warp_barriers.clear();
      for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      emu_warp_slots.assign(threads, 0.0);
      std::vector<std::thread> ts;
      ts.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        ts.emplace_back([&, t] {
          threadIdx = {t % block.x, t / block.x, 0};
          blockIdx = {bx, by, 0};
          emu_block_barrier = &bar;
          body();
        });
      }
      for (auto& t : ts) t.join();
    }
  }
}
