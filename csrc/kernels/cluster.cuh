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
// threads (block_sums), then every thread adds the blocks' sums in rank order, so every
// thread of every block gets bitwise the same totals.
// Block sums are published in `slots` ([2][kMaxSums] in shared memory), alternating
// halves from call to call: a half is written again only two calls later, after a
// cluster barrier that every block reaches after reading it. Before a block exits, the
// kernel must call cluster_sync() once more, so that no block reads from a block that
// has left.
template <typename A>
struct ClusterSum {
  A* scratch;  // kSumScratch values for block_sums
  A* slots;    // [2][kMaxSums]
  int calls = 0;

  // Scratch and slots at the start of a cluster kernel's dynamic shared memory
  // (cluster_header_words<A>() 16-byte words).
  __device__ explicit ClusterSum(uint4* header)
      : scratch(reinterpret_cast<A*>(header)), slots(scratch + kSumScratch) {}

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
// block_sums scratch and ClusterSum slots (2 x kMaxSums values) of acc type A.
template <typename A>
__host__ __device__ constexpr int cluster_header_words() {
  return static_cast<int>(((kSumScratch + 2 * kMaxSums) * sizeof(A) + 15) / 16);
}

}  // namespace kernels
}  // namespace ln_ext
