// What the device code in csrc/kernels takes from CUDA beyond plain C++, in one place.
// nvcc gets the real thing; the host emulation (scripts/kernel_check, which defines
// LN_EXT_HOST_EMULATION and puts its emu_runtime.h on the include path) gets stand-ins
// of the same names, so the code it runs is byte for byte the code nvcc compiles.
//
//   LN_EXT_SHARED(type, name, [dims]);  a block's static shared array, at kernel scope
//   LN_EXT_DYNAMIC_SHARED(name);        the block's dynamic shared memory, uint4 name[]
//   LN_EXT_ASSERT_ALIGNED16(p);         nothing on the GPU; checked by the emulation
//   cluster_rank(), cluster_blocks(), cluster_sync(), cluster_peer(p, rank),
//   cluster_fence(), cluster_sync_relaxed()
//                                       thread-block clusters (sm_90+; they trap when
//                                       compiled for an older architecture)
// threadIdx, blockDim, __syncthreads(), __syncwarp(), __shfl_sync() and __shfl_xor_sync()
// are used by their CUDA names; the emulation defines those too.
#pragma once

#if defined(LN_EXT_HOST_EMULATION)
#include "emu_runtime.h"
#else
#include <cooperative_groups.h>

#define LN_EXT_SHARED(type, name, dims) __shared__ type name dims
#define LN_EXT_DYNAMIC_SHARED(name) extern __shared__ uint4 name[]
#define LN_EXT_ASSERT_ALIGNED16(p) ((void)0)

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

// Makes this thread's earlier writes (shared memory included) visible to the cluster
// before its next cluster_sync_relaxed(): with it, that barrier releases what the thread
// wrote, without every thread of every block paying for a release (a cluster-scope
// release barrier compiles to MEMBAR.ALL.GPU in every thread, which waits for all its
// outstanding stores).
__device__ __forceinline__ void cluster_fence() {
#ifdef LN_EXT_CLUSTERS
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
#else
  __trap();
#endif
}

// A cluster barrier that releases nothing by itself (relaxed arrive) and acquires
// (wait): writes published by cluster_fence() before it are visible after it.
__device__ __forceinline__ void cluster_sync_relaxed() {
#ifdef LN_EXT_CLUSTERS
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
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

}  // namespace kernels
}  // namespace ln_ext
#endif  // LN_EXT_HOST_EMULATION
