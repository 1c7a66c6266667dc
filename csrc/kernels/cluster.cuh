// Thread-block clusters (sm_90+): a deterministic sum over all threads of a cluster.
// Device code only; knows nothing of torch.
//
// A cluster's blocks run at the same time on neighbouring multiprocessors and can
// read each other's shared memory (distributed shared memory, DSMEM). The cluster
// kernels cut one row across the blocks of a cluster, each block keeping its slice
// on chip, and meet only to add per-block sums.
//
// The cluster operations themselves are in platform.cuh (the host emulation has its
// own); built for an architecture without clusters they trap, and the launchers start
// the cluster kernels only where the kernel's code was compiled for sm_90+.
#pragma once

#include "platform.cuh"
#include "reduce.cuh"

namespace ln_ext {
namespace kernels {

// Sums of up to kMaxSums values over all threads of a cluster: each block adds its
// threads (block_sums), thread 0 publishes the block's sums in its `slots`, and after a
// cluster barrier the blocks' sums are added in rank order, so every thread of every
// block gets bitwise the same totals. Two ways to meet (the first GPU run times both,
// LN_EXT_CLUSTER_SUM=barrier|lean, see csrc/cuda/launch_common.cuh):
//  * barrier (default): a release/acquire cluster barrier, then every thread reads every
//    block's slots through distributed shared memory (blocks x K remote loads each);
//  * lean: only warp 0 fences (cluster_fence: thread 0's slot writes, and the warp's
//    reads of the last call) before a relaxed barrier, lane r of warp 0 reads block r's
//    slots, the warp adds them in rank order (shuffles) and lane 0 broadcasts the totals
//    through this block's `totals`: one warp's fence and 32 remote loads a block instead
//    of every thread's release and blocks x K remote loads per thread.
// In the lean meeting only warp 0 may touch another block's shared memory (its fence is
// what orders those accesses across the relaxed barrier), and a cluster has at most 32
// blocks (one a lane; launch_common.cuh asserts it).
// Slots alternate halves from call to call: a half is written again only two calls
// later, after a cluster barrier that every block reaches after reading it; `totals` is
// written again only after the next call's block_sums barriers, which every reader of
// it has passed. Before a block exits, the kernel must call cluster_sync() once more,
// so that no block reads from a block that has left.
template <typename A>
struct ClusterSum {
  A* scratch;  // kSumScratch values for block_sums
  A* slots;    // [2][kMaxSums]
  A* totals;   // [kMaxSums] (lean)
  bool lean;
  int calls = 0;

  // Scratch, slots and totals at the start of a cluster kernel's dynamic shared memory
  // (cluster_header_words<A>() 16-byte words).
  __device__ ClusterSum(uint4* header, bool lean_meeting)
      : scratch(reinterpret_cast<A*>(header)), slots(scratch + kSumScratch),
        totals(slots + 2 * kMaxSums), lean(lean_meeting) {}

  __device__ A operator()(A v) {
    A one[1] = {v};
    (*this)(one);
    return one[0];
  }

  template <int K>
  __device__ void operator()(A (&v)[K]) {
    A* const mine = slots + (calls & 1) * kMaxSums;
    ++calls;
    block_sums(v, scratch);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) mine[k] = v[k];
    }
    const int blocks = cluster_blocks();
    if (!lean) {
      cluster_sync();
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = 0;
      for (int r = 0; r < blocks; ++r) {
        const A* theirs = cluster_peer(mine, r);
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] += theirs[k];
      }
      return;
    }
    // Warp 0 is where the slots are written (thread 0) and every block's slots read: its
    // fence orders both against the other blocks' accesses across the relaxed barrier.
    if (threadIdx.x < 32) cluster_fence();
    cluster_sync_relaxed();
    if (threadIdx.x < 32) {
      const int lane = static_cast<int>(threadIdx.x);
      A theirs[K];
#pragma unroll
      for (int k = 0; k < K; ++k) theirs[k] = lane < blocks ? cluster_peer(mine, lane)[k] : A(0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        A total = 0;
        for (int r = 0; r < blocks; ++r) total += __shfl_sync(0xffffffffu, theirs[k], r);
        if (lane == 0) totals[k] = total;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = totals[k];
  }
};

// How the cluster kernels cut a row of `count` chunks: block `rank` owns chunks
// [rank * slice_chunks, (rank + 1) * slice_chunks) of it (the last blocks may own
// fewer or none), and for dweight/dbias the row's columns
// [rank * slice_chunks * V, (rank + 1) * slice_chunks * V).
__host__ __device__ constexpr int cluster_slice_chunks(int chunks, int blocks) {
  return (chunks + blocks - 1) / blocks;
}

// Elements of shared memory before the cluster kernels' row cache, in 16-byte words:
// block_sums scratch, ClusterSum slots (2 x kMaxSums values) and totals (kMaxSums) of
// acc type A.
template <typename A>
__host__ __device__ constexpr int cluster_header_words() {
  return static_cast<int>(((kSumScratch + 3 * kMaxSums) * sizeof(A) + 15) / 16);
}

}  // namespace kernels
}  // namespace ln_ext
