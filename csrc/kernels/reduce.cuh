// Sums across the threads that share a row. Device code only; knows nothing of torch.
//
// Deterministic: the xor butterfly adds the same pair of values in every lane
// (a + b == b + a bitwise), so all lanes of a group end with identical bits,
// and the cross-warp step adds the warp sums in warp order.
#pragma once

namespace ln_ext {
namespace kernels {

// Sum over aligned groups of `width` lanes (a power of two <= 32). Every lane of
// the warp must call it (full-warp shuffles); each lane gets its group's sum.
template <typename A>
__device__ __forceinline__ A warp_group_sum(A v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every
// thread must call it; `scratch` holds at least 32 values. Returns the sum to
// every thread and leaves `scratch` free for the next call.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  v = warp_group_sum(v, 32);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  A total = 0;
  const int warps = blockDim.x / 32;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Sum over the `group` threads of a row: a warp slice (group <= 32) or the
// whole block (group == blockDim.x > 32). Every thread of the block must call it.
template <typename A>
__device__ __forceinline__ A row_group_sum(A v, int group, A* scratch) {
  return group <= 32 ? warp_group_sum(v, group) : block_sum(v, scratch);
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
