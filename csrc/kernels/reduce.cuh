// Sums across the threads that share a row. Device code only; knows nothing of torch.
//
// Deterministic: the xor butterfly adds the same pair of values in every lane
// (a + b == b + a bitwise), so all lanes of a group end with identical bits,
// and the cross-warp step adds the warp sums in warp order.
// K values are summed at once (one butterfly, one pair of barriers for all of them).
#pragma once

#include "platform.cuh"

namespace ln_ext {
namespace kernels {

// Threads per block of the rows kernels when several rows share a block: always at K=1
// (rows of up to 32 chunks), which their __launch_bounds__ count on, and at K=4 / K=2 for
// groups of up to 32 threads (those kernels are bounded at 512).
constexpr int kMultiRowBlock = 256;

// Shared scratch a block sum of up to kMaxSums values needs: 32 (one per warp) each.
constexpr int kMaxSums = 3;
constexpr int kSumScratch = 32 * kMaxSums;

// Sums over aligned groups of `width` lanes (a power of two <= 32). Every lane of
// the warp must call it (full-warp shuffles); each lane gets its group's sums.
template <int K, typename A>
__device__ __forceinline__ void warp_group_sums(A (&v)[K], int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
}

// Sums over the whole block (blockDim.x a multiple of 32, at most 1024). Every
// thread must call it; `scratch` holds at least 32 * K values. Returns the sums to
// every thread and leaves `scratch` free for the next call.
template <int K, typename A>
__device__ __forceinline__ void block_sums(A (&v)[K], A* scratch) {
  static_assert(K <= kMaxSums, "scratch is sized for kMaxSums values");
  warp_group_sums(v, 32);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k * 32 + warp] = v[k];
  }
  __syncthreads();
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[k * 32 + w];
    v[k] = total;
  }
  __syncthreads();
}

// Sums over the `group` threads of a row: a warp slice (group <= 32) or the
// whole block (group == blockDim.x > 32). Every thread of the block must call it.
template <int K, typename A>
__device__ __forceinline__ void row_group_sums(A (&v)[K], int group, A* scratch) {
  if (group <= 32) {
    warp_group_sums(v, group);
  } else {
    block_sums(v, scratch);
  }
}

// One value: the sum itself.
template <typename A>
__device__ __forceinline__ A row_group_sum(A v, int group, A* scratch) {
  A one[1] = {v};
  row_group_sums(one, group, scratch);
  return one[0];
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  A one[1] = {v};
  block_sums(one, scratch);
  return one[0];
}

// Orders the shared-memory accesses of the `group` threads of a row: the warp
// (group <= 32) or the block. Every thread of the block must call it.
__device__ __forceinline__ void row_group_sync(int group) {
  if (group <= 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

}  // namespace kernels
}  // namespace ln_ext
