// Launch helpers shared by the CUDA LayerNorm launchers: torch -> device element
// types, alignment tests, grid sizing and the choice of kernel shape by N.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>

#include "../kernels/cluster.cuh"
#include "cluster_support.h"

namespace ln_ext {
namespace cuda_launch {

// Longest row the kernels index with int column offsets (chunk math adds < 2 * 16).
constexpr int64_t kMaxCols = INT_MAX - 64;

// Threads per block when several rows share a block (the rows kernels' launch bounds count on it).
constexpr int kMultiRowBlock = kernels::kMultiRowBlock;

// Threads per block of the one-row-per-block "long" kernels.
constexpr int kLongBlock = 1024;

// The kernels' element type for a tensor element type (same bits).
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Raw pointer of a tensor's elements as the device type T, nullptr when undefined.
template <typename T>
const T* const_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// True for nullptr too: an absent tensor never blocks vector access.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The few limits of the current device the launchers size grids by, read once
// per device: small LayerNorms are host-bound, so a launch makes no driver query.
// (ATen/cuda/CUDAContext.h would give the cached cudaDeviceProp but pulls in
// cuSPARSE/cuBLAS headers that a bare CUDA toolkit may lack.)
struct DeviceLimits {
  int multiprocessors;
  int threads_per_sm;
  size_t smem_per_sm;
  size_t smem_per_block_optin;
  bool cluster_launch;  // thread-block clusters (sm_90+)
};

inline const DeviceLimits& device_limits() {
  static const int devices = c10::cuda::device_count();
  static const std::unique_ptr<std::once_flag[]> once(new std::once_flag[devices]);
  static const std::unique_ptr<DeviceLimits[]> limits(new DeviceLimits[devices]);
  const int device = c10::cuda::current_device();
  std::call_once(once[device], [device] {
    auto attribute = [device](cudaDeviceAttr attr) {
      int value = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
      return value;
    };
    limits[device] = {attribute(cudaDevAttrMultiProcessorCount),
                      attribute(cudaDevAttrMaxThreadsPerMultiProcessor),
                      static_cast<size_t>(attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor)),
                      static_cast<size_t>(attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)),
                      attribute(cudaDevAttrClusterLaunch) != 0};
  });
  return limits[device];
}

inline int multiprocessor_count() { return device_limits().multiprocessors; }

// LN_EXT_LOG_LAUNCHES=1 in the environment: each distinct LayerNorm kernel launch is
// printed once to stderr, e.g. "ln_ext launch: fwd cluster rows=2 N=262144 grid=16
// block=1024 cluster=8 smem=65680", to see which kernel a shape takes (the GPU tests
// and scripts/gpu_check.sh read them).
inline void log_launch(const char* kernel, int64_t rows, int64_t cols, int grid, int block,
                       int cluster, size_t smem) {
  static const bool enabled = [] {
    const char* v = std::getenv("LN_EXT_LOG_LAUNCHES");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  if (!enabled) return;
  char line[192];
  std::snprintf(line, sizeof(line), "ln_ext launch: %s rows=%lld N=%lld grid=%d block=%d cluster=%d smem=%zu",
                kernel, static_cast<long long>(rows), static_cast<long long>(cols), grid, block, cluster, smem);
  static std::mutex mutex;
  static std::set<std::string> seen;
  const std::lock_guard<std::mutex> lock(mutex);
  if (seen.insert(line).second) std::fprintf(stderr, "%s\n", line);
}

// Facts about a kernel that the driver gives once and that never change, asked once per
// (device, kernel, fact, a, b) and kept: small LayerNorms are host-bound, and a launch
// should not pay for a driver query. `compute` runs at most once per key, under a
// recursive lock (a fact may need another: the resident clusters need the raised
// shared-memory limit).
enum class KernelFact { kSharedMemoryLimitRaised, kResidentBlocksPerSm, kResidentClusters };

using KernelFactKey = std::tuple<int, KernelFact, const void*, int64_t, int64_t>;

// One table and lock for every fact (a template's function-local statics would be one
// per call site).
inline std::pair<std::recursive_mutex&, std::map<KernelFactKey, int>&> kernel_facts() {
  static std::recursive_mutex mutex;
  static std::map<KernelFactKey, int> known;
  return {mutex, known};
}

template <typename Compute>
int kernel_fact(KernelFact fact, const void* kernel, int64_t a, int64_t b, Compute&& compute) {
  auto [mutex, known] = kernel_facts();
  const KernelFactKey key{c10::cuda::current_device(), fact, kernel, a, b};
  const std::lock_guard<std::recursive_mutex> lock(mutex);
  if (auto it = known.find(key); it != known.end()) return it->second;
  const int value = compute();
  known.emplace(key, value);
  return value;
}

// Dynamic shared memory one block may use: the opt-in limit less the kernels'
// own __shared__ scratch.
inline size_t dynamic_shared_memory_limit() {
  constexpr size_t kStaticReserve = 1024;
  return device_limits().smem_per_block_optin - kStaticReserve;
}

// Above 48 KiB a kernel must opt in to its dynamic shared memory. The limit is raised
// once per (device, kernel), to the most any launch of it may use: setting it to each
// launch's own size let two host threads launching one kernel with different sizes
// interleave set(200 KB), set(100 KB), launch(200 KB) -> cudaErrorInvalidValue.
template <typename Kernel>
void allow_dynamic_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  kernel_fact(KernelFact::kSharedMemoryLimitRaised, reinterpret_cast<const void*>(kernel), 0, 0, [kernel] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_shared_memory_limit())));
    return 1;
  });
}

// A persistent grid: as many blocks as the work needs, at most as many as the
// multiprocessors hold at once, as the occupancy calculator counts them for this
// kernel, block size and dynamic shared memory (registers included: the fused
// backward's grid is also its number of partial rows, and a kernel held back by
// registers would otherwise write several times the partials it needs).
template <typename Kernel>
int persistent_grid(Kernel kernel, int64_t blocks_needed, int block_threads, size_t smem_bytes = 0) {
  allow_dynamic_shared_memory(kernel, smem_bytes);
  const int per_sm = kernel_fact(KernelFact::kResidentBlocksPerSm, reinterpret_cast<const void*>(kernel),
                                 block_threads, static_cast<int64_t>(smem_bytes), [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, smem_bytes));
    return std::max(blocks, 1);
  });
  const int64_t resident = static_cast<int64_t>(multiprocessor_count()) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks_needed, resident)));
}

// Whether `bytes` of dynamic shared memory fit in one block.
inline bool fits_in_shared_memory(size_t bytes) { return bytes <= dynamic_shared_memory_limit(); }

// How many of a row's `chunks` chunks (`chunk_bytes` each) a long kernel caches in
// the shared memory left after `used` bytes: all when they fit, else as many as fit
// (the rest is re-read; a partly cached row still saves those re-reads).
inline int cached_chunks(int chunks, size_t chunk_bytes, size_t used) {
  const size_t limit = dynamic_shared_memory_limit();
  const size_t room = used < limit ? (limit - used) / chunk_bytes : 0;
  return static_cast<int>(std::min<size_t>(chunks, room));
}

// A launch of a cluster kernel (kernels/cluster.cuh): `blocks` blocks of kLongBlock
// threads per row, each with `slice_chunks` of the row's chunks and `smem` bytes of
// dynamic shared memory; `grid` blocks in all. blocks == 0: no cluster launch.
struct ClusterPlan {
  int blocks = 0;
  int slice_chunks = 0;
  size_t smem = 0;
  int grid = 0;
  int clusters() const { return grid / blocks; }
};

// Largest cluster tried: 16 blocks is "non-portable" (sm_90 allows it per kernel,
// when a GPU processing cluster has 16 free multiprocessors); 8 is always allowed.
constexpr int kMaxClusterBlocks = 16;
constexpr int kMaxPortableClusterBlocks = 8;
// ClusterSum's lean meeting reads block r's sums in lane r of warp 0 (kernels/cluster.cuh).
static_assert(kMaxClusterBlocks <= 32, "a cluster's blocks must fit in one warp's lanes");

// The launch of `grid` blocks of kLongBlock threads in clusters of `blocks`
// (`attribute` holds the cluster shape and must outlive the returned config).
inline cudaLaunchConfig_t cluster_config(int blocks, int grid, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute* attribute) {
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = static_cast<unsigned>(blocks);
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(kLongBlock);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// How many clusters of `blocks` blocks (kLongBlock threads, `smem` bytes of dynamic
// shared memory each) of `kernel` the current device runs at once; 0 when none (the
// kernel's code was not compiled for sm_90+: kernel_has_cluster_code, or no processing
// cluster has room for `blocks` blocks). Asked once per (device, kernel, blocks, smem).
template <typename Kernel>
int resident_cluster_count(Kernel kernel, int blocks, size_t smem) {
  return kernel_fact(KernelFact::kResidentClusters, reinterpret_cast<const void*>(kernel), blocks,
                     static_cast<int64_t>(smem), [&] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    if (!kernel_has_cluster_code(attributes.ptxVersion, attributes.binaryVersion)) return 0;
    allow_dynamic_shared_memory(kernel, smem);
    if (blocks > kMaxPortableClusterBlocks) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    cudaLaunchAttribute cluster_shape;
    const cudaLaunchConfig_t config = cluster_config(blocks, blocks, smem, nullptr, &cluster_shape);
    int resident = 0;
    if (cudaOccupancyMaxActiveClusters(&resident, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // not schedulable here: clear the error; the caller falls back
      resident = 0;
    }
    return resident;
  });
}

// How the cluster kernels' blocks meet to add their sums (kernels/cluster.cuh:
// ClusterSum): LN_EXT_CLUSTER_SUM=lean for one warp's fence, a relaxed barrier and a
// warp-0 gather; unset or "barrier" for the release/acquire cluster barrier and every
// thread reading every block's sums. Read once per process; `make gpu-check` times both.
inline bool lean_cluster_sum() {
  static const bool lean = [] {
    const char* v = std::getenv("LN_EXT_CLUSTER_SUM");
    const std::string mode = v == nullptr ? "barrier" : v;
    TORCH_CHECK(mode == "barrier" || mode == "lean" || mode.empty(),
                "ln_ext: LN_EXT_CLUSTER_SUM must be 'barrier' or 'lean', got '", mode, "'");
    return mode == "lean";
  }();
  return lean;
}

// The cluster for rows of `chunks` chunks: the fewest blocks (1, 2, 4, 8, 16) whose
// slices fit in one block's shared memory (`smem_for(slice_chunks)` bytes), doubled
// (up to 8) while `rows` such clusters would leave most multiprocessors idle.
// blocks == 0 when one block per row would do (the long kernels), when no cluster
// fits, or when the device or the kernel's binary has no clusters.
template <typename Kernel, typename SmemFor>
ClusterPlan plan_cluster(Kernel kernel, int chunks, int64_t rows, SmemFor smem_for) {
  const DeviceLimits& dev = device_limits();
  if (!dev.cluster_launch) return {};
  int blocks = 1;
  while (blocks <= kMaxClusterBlocks &&
         !fits_in_shared_memory(smem_for(kernels::cluster_slice_chunks(chunks, blocks)))) {
    blocks *= 2;
  }
  if (blocks > kMaxClusterBlocks) return {};
  while (blocks < kMaxPortableClusterBlocks && rows * blocks * 2 <= dev.multiprocessors) blocks *= 2;
  if (blocks == 1) return {};

  ClusterPlan plan;
  plan.blocks = blocks;
  plan.slice_chunks = kernels::cluster_slice_chunks(chunks, blocks);
  plan.smem = smem_for(plan.slice_chunks);
  const int resident_clusters = resident_cluster_count(kernel, blocks, plan.smem);
  if (resident_clusters == 0) return {};
  // Persistent: clusters beyond those resident at once would only wait (and, in the
  // backward, add partial rows).
  plan.grid = static_cast<int>(std::min<int64_t>(rows, resident_clusters)) * blocks;
  return plan;
}

// Launches a cluster kernel by its plan on `stream` (its shared-memory limit was
// raised when the plan asked for its resident clusters).
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), const ClusterPlan& plan, cudaStream_t stream,
                    Args&&... args) {
  cudaLaunchAttribute cluster_shape;
  const cudaLaunchConfig_t config =
      cluster_config(plan.blocks, plan.grid, plan.smem, stream, &cluster_shape);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// The shape of the rows kernels for a row of `chunks` chunks (vec.cuh):
// k chunks per thread, `group` threads per row, `block` threads per block.
// k == 0: the row does not fit in registers; use the long kernel.
struct RowsConfig {
  int k;
  int group;
  int block;
  int rows_per_block() const { return block / group; }
};

// Rows of up to 32 chunks: one chunk per thread, 1..32 threads per row, several
// rows per warp. Longer rows: `big_k` chunks per thread and up to `max_group`
// threads (a warp slice, a warp or a whole block) per row.
inline RowsConfig choose_rows_config(int chunks, int big_k, int max_group) {
  if (chunks <= 32) {
    return {1, pow2_at_least(chunks), kMultiRowBlock};
  }
  if (chunks <= big_k * max_group) {
    const int group = pow2_at_least(static_cast<int>(ceil_div(chunks, big_k)));
    // A group wider than a warp sums through the block: it must be the whole block.
    return {big_k, group, group <= 32 ? kMultiRowBlock : group};
  }
  return {0, 0, kLongBlock};
}

}  // namespace cuda_launch
}  // namespace ln_ext
