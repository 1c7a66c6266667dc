// Thread-block clusters (sm_90+): the few operations the cluster kernels use, and a
// deterministic sum over all threads of a cluster. Device code only; knows nothing of torch.
//
// A cluster's blocks run at the same time on neighbouring multiprocessors and can
// read each other's shared memory (distributed shared memory, DSMEM). The cluster
// kernels cut one row across the blocks of a cluster, each block keeping its slice
// on chip, and meet only to add per-block sums.
//
// Built for an architecture without clusters the operations trap: the launchers
// start the cluster kernels only on devices whose binary has them (sm_90+).
// scripts/kernel_check replaces this file with a host emulation.
#pragma once

#include <cooperative_groups.h>

#include "reduce.cuh"

namespace ln_ext {
namespace kernels {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define LN_EXT_CLUSTERS 1
#endif

// This block's rank in its cluster, 0 .. cluster_blocks() - 1.
__device__ __forceinline__ int cluster_rank() {
#ifdef LN_EXT_CLUSTERS
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  __trap();
  return 0;
#endif
}

__device__ __forceinline__ int cluster_blocks() {
#ifdef LN_EXT_CLUSTERS
  return static_cast<int>(cooperative_groups::this_cluster().num_blocks());
#else
  __trap();
  return 1;
#endif
}

// Barrier over every thread of the cluster; orders shared-memory writes before it
// (in any block) before reads after it (in any block).
__device__ __forceinline__ void cluster_sync() {
#ifdef LN_EXT_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

// The address of `local` (in this block's shared memory) in block `rank`'s.
template <typename A>
__device__ __forceinline__ A* cluster_peer(A* local, int rank) {
#ifdef LN_EXT_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<unsigned>(rank));
#else
  __trap();
  return local;
#endif
}

// Sums of K values over all threads of a cluster: each block adds its threads
// (block_sum), then every thread adds the blocks' sums in rank order, so every
// thread of every block gets bitwise the same totals.
// Block sums are published in `slots` ([2][K] in shared memory), alternating halves
// from call to call: a half is written again only two calls later, after a cluster
// barrier that every block reaches after reading it. Before a block exits, the
// kernel must call cluster_sync() once more, so that no block reads from a
// block that has left.
template <typename A, int K>
struct ClusterSum {
  static_assert(K <= 2, "cluster_header_words() holds slots for two values");
  A* scratch;  // 32 values for block_sum
  A* slots;    // [2][K]
  int calls = 0;

  // Scratch and slots at the start of a cluster kernel's dynamic shared memory
  // (cluster_header_words<A>() 16-byte words).
  __device__ explicit ClusterSum(uint4* header)
      : scratch(reinterpret_cast<A*>(header)), slots(scratch + 32) {}

  __device__ A operator()(A v) {
    static_assert(K == 1, "one value: ClusterSum<A, 1>");
    A one[1] = {v};
    (*this)(one);
    return one[0];
  }

  __device__ void operator()(A (&v)[K]) {
    A* const mine = slots + (calls & 1) * K;
    ++calls;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A block_total = block_sum(v[k], scratch);
      if (threadIdx.x == 0) mine[k] = block_total;
    }
    cluster_sync();
    const int blocks = cluster_blocks();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0;
    for (int r = 0; r < blocks; ++r) {
      const A* theirs = cluster_peer(mine, r);
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += theirs[k];
    }
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
// block_sum scratch (32 values) and ClusterSum slots (2 x 2 values) of acc type A.
template <typename A>
__host__ __device__ constexpr int cluster_header_words() {
  return static_cast<int>((36 * sizeof(A) + 15) / 16);
}

}  // namespace kernels
}  // namespace ln_ext
