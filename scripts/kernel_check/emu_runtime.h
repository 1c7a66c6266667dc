// Host emulation of the few CUDA device features the ln_ext kernels use (the stand-ins
// csrc/kernels/platform.cuh names): one std::thread per CUDA thread, the threads of a
// block (of every block of a cluster) running together, clusters one after another.
// Shared memory is per block and starts dirty; every 16-byte access checks its alignment.
// Built with -DLN_EXT_HOST_EMULATION (run_host_emulation.sh), under AddressSanitizer
// or ThreadSanitizer: the threads are real and std::barrier orders them, so a shared-
// memory write and a read by another thread with no barrier between is a data race.
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

// Dirty shared memory: what a kernel reads before it writes is garbage, not zeros.
constexpr unsigned kEmuDirty = 0xdeadbeefu;
// CUDA's limit of static shared memory per block.
constexpr size_t kEmuStaticSmemBytes = 48 * 1024;

// One running block: its barrier, warps, static and dynamic shared memory.
struct EmuBlock {
  explicit EmuBlock(unsigned threads)
      : barrier(threads), warp_slots(threads, 0.0),
        static_smem(kEmuStaticSmemBytes / 16, uint4{kEmuDirty, kEmuDirty, kEmuDirty, kEmuDirty}) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> warp_slots;  // [warps * 32]
  std::vector<uint4> static_smem;
  std::vector<uint4>* smem = nullptr;  // dynamic
};
inline thread_local EmuBlock* emu_block = nullptr;
// Where this thread's next LN_EXT_SHARED array starts in its block's static shared
// memory: every thread makes the same declarations in the same order, so all threads
// of a block get the same addresses.
inline thread_local size_t emu_static_cursor = 0;

// The running thread-block cluster (a plain launch: clusters of one block).
inline thread_local unsigned emu_cluster_rank = 0;
inline unsigned emu_cluster_blocks = 1;
inline std::barrier<>* emu_cluster_barrier = nullptr;
inline std::vector<std::vector<uint4>> emu_smem;  // per block of a cluster, left dirty from cluster to cluster

namespace emu {
inline uint4* dynamic_smem() { return emu_block->smem->data(); }

template <typename T>
T& block_shared() {
  emu_static_cursor = (emu_static_cursor + 15) / 16 * 16;
  assert(emu_static_cursor + sizeof(T) <= kEmuStaticSmemBytes && "static shared memory overflow");
  char* base = reinterpret_cast<char*>(emu_block->static_smem.data());
  T* p = reinterpret_cast<T*>(base + emu_static_cursor);
  emu_static_cursor += sizeof(T);
  return *p;
}

inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "misaligned 16-byte access at %p\n", p);
    std::abort();
  }
}
}  // namespace emu

#define LN_EXT_SHARED(type, name, dims) auto& name = ::emu::block_shared<type dims>()
#define LN_EXT_DYNAMIC_SHARED(name) uint4* name = ::emu::dynamic_smem()
#define LN_EXT_ASSERT_ALIGNED16(p) ::emu::check_aligned16(p)

inline void __syncthreads() { emu_block->barrier.arrive_and_wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  assert(mask == 0xffffffffu);
  emu_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}

// Every lane of the warp publishes v, then reads lane `src_of(lane)`'s.
template <typename A, typename Src>
A emu_shuffle(A v, Src src_of) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu_block->warp_slots[warp * 32 + lane] = static_cast<double>(v);
  emu_block->warp_barriers[warp]->arrive_and_wait();
  const A r = static_cast<A>(emu_block->warp_slots[warp * 32 + src_of(lane)]);
  emu_block->warp_barriers[warp]->arrive_and_wait();
  return r;
}
template <typename A>
A __shfl_xor_sync(unsigned mask, A v, int offset) {
  assert(mask == 0xffffffffu);
  return emu_shuffle(v, [offset](int lane) { return lane ^ offset; });
}
template <typename A>
A __shfl_sync(unsigned mask, A v, int src_lane) {
  assert(mask == 0xffffffffu && src_lane >= 0 && src_lane < 32);
  return emu_shuffle(v, [src_lane](int) { return src_lane; });
}

namespace ln_ext {
namespace kernels {
inline int cluster_rank() { return static_cast<int>(emu_cluster_rank); }
inline int cluster_blocks() { return static_cast<int>(emu_cluster_blocks); }
inline void cluster_sync() { emu_cluster_barrier->arrive_and_wait(); }
inline void cluster_fence() {}  // the emulated barrier orders memory by itself
inline void cluster_sync_relaxed() { emu_cluster_barrier->arrive_and_wait(); }
template <typename A>
A* cluster_peer(A* local, int rank) {
  const char* mine = reinterpret_cast<const char*>(emu_block->smem->data());
  const size_t offset = reinterpret_cast<const char*>(local) - mine;
  assert(offset < emu_block->smem->size() * sizeof(uint4) && rank < static_cast<int>(emu_cluster_blocks));
  return reinterpret_cast<A*>(reinterpret_cast<char*>(emu_smem[rank].data()) + offset);
}
}  // namespace kernels
}  // namespace ln_ext

// Runs the grid cluster by cluster (`cluster` blocks along x, all of a cluster at
// once, one std::thread per CUDA thread); a plain launch is clusters of one block.
inline void emu_launch(EmuDim grid, EmuDim block, size_t smem_bytes, const std::function<void()>& body,
                       unsigned cluster = 1) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y;
  assert(threads % 32 == 0 && threads <= 1024 && grid.x % cluster == 0);
  emu_cluster_blocks = cluster;
  emu_smem.assign(cluster, std::vector<uint4>(smem_bytes / 16 + 1, uint4{kEmuDirty, kEmuDirty, kEmuDirty, kEmuDirty}));
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned cx = 0; cx < grid.x; cx += cluster) {
      std::barrier<> cluster_barrier(threads * cluster);
      emu_cluster_barrier = &cluster_barrier;
      std::vector<std::unique_ptr<EmuBlock>> blocks;
      for (unsigned r = 0; r < cluster; ++r) {
        blocks.push_back(std::make_unique<EmuBlock>(threads));
        blocks.back()->smem = &emu_smem[r];
      }
      std::vector<std::thread> ts;
      ts.reserve(threads * cluster);
      for (unsigned r = 0; r < cluster; ++r) {
        for (unsigned t = 0; t < threads; ++t) {
          ts.emplace_back([&, r, t] {
            threadIdx = {t % block.x, t / block.x, 0};
            blockIdx = {cx + r, by, 0};
            emu_block = blocks[r].get();
            emu_static_cursor = 0;
            emu_cluster_rank = r;
            body();
          });
        }
      }
      for (auto& t : ts) t.join();
    }
  }
}
