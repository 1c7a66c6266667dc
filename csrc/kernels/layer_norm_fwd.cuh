// LayerNorm forward kernels. Device code only; knows nothing of torch.
//
// Computes, for each row of x: [M, N], by the corrected two-pass algorithm
// (norm_math.cuh: RowStats) over the on-chip row:
//   m0 = sum(x) / N;  c = sum(x - m0) / N,  var = (sum((x - m0)^2) - N c^2) / N
//   mean = m0 + c,  rstd = 1 / sqrt(var + eps)            (correctly rounded)
//   y    = ((x - m0) - c) * rstd * weight + bias           (weight/bias optional)
// accumulating in acc_t<T> (float, or double for double x). mean/rstd: [M]. Two
// reductions per row, as a plain two-pass: the second adds two values at once.
//
// Two families, both reading x from device memory with the chunk grid of vec.cuh
// (16-byte loads/stores, per-row peeled head/tail when N % V != 0):
//  * rows kernel: the row lives in registers, K chunks per thread, `group`
//    threads per row (group <= 32: 32/group rows per warp, several rows per
//    block; group > 32: one row per block of `group` threads). Persistent grid
//    stride over batches of rows. x is read exactly once.
//  * long kernel: any N. One row per block; each thread walks its chunks three
//    times (sum, centered squares, output). The row's first `cached_chunks`
//    chunks (all of it when it fits) are first copied raw into shared memory and
//    the passes read them there; the rest of a longer row is re-read from x (L2).
//  * cluster kernel (sm_90): one row per thread-block cluster (cluster.cuh).
//    Block `rank` caches its slice of the row's chunks in shared memory (read
//    once from x) and works on it alone; the row's two sums are added across the
//    cluster through distributed shared memory. For rows longer than one block's
//    shared memory (bf16 N = 262144 is 512 KB) and to spread few rows over more
//    multiprocessors.
// Assumes: N >= 1, N + 2*V fits in int, group a power of two, blockDim.x a
// multiple of group and of 32, group * K >= max_chunks_per_row(N, V).
// Measured: not yet on a GPU (see benchmarks/NOTES.md for ptxas/SASS facts).
#pragma once

#include "cluster.cuh"
#include "norm_math.cuh"
#include "reduce.cuh"
#include "vec.cuh"

namespace ln_ext {
namespace kernels {

// Bytes of a row each thread loads at once while filling a row cache (cache_chunks).
constexpr int kFwdCacheBatchBytes = 64;

template <typename T, typename P, typename Y>
struct FwdParams {
  const T* x;       // [M, N]
  const P* weight;  // [N] or nullptr (acts as 1)
  const P* bias;    // [N] or nullptr (acts as 0)
  Y* y;             // [M, N]
  acc_t<T>* mean;   // [M]
  acc_t<T>* rstd;   // [M]
  int64_t rows;
  int cols;
  acc_t<T> eps;
  bool vec_ok;         // x and y 16-byte aligned: full chunks may use vector access
  bool params_vec_ok;  // weight and bias (those present) 16-byte aligned
  bool lean_cluster_sum = false;  // cluster kernel: how ClusterSum meets (cluster.cuh)
};

// y for the chunk's columns from the row's x values v (acc), then store.
template <int V, typename T, typename P, typename Y, typename A>
__device__ __forceinline__ void fwd_write_chunk(const FwdParams<T, P, Y>& p, Y* y_chunk,
                                                bool full, bool params_vec, int col0,
                                                const A (&v)[V], const RowStats<A>& st) {
  A w[V], b[V], out[V];
  load_param_chunk(p.weight, params_vec, col0, p.cols, A(1), w);
  load_param_chunk(p.bias, params_vec, col0, p.cols, A(0), b);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = st.xhat(v[i]) * w[i] + b[i];
  store_chunk(y_chunk, full, col0, p.cols, out);
}

// Adds this thread's share of sum(x - shift) and sum((x - shift)^2) over the chunk's
// columns in the row.
template <int V, typename A>
__device__ __forceinline__ void add_deviations(const A (&v)[V], int col0, int n, A shift,
                                               A (&dev)[2]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const A d = in_row(col0 + i, n) ? v[i] - shift : A(0);
    dev[0] += d;
    dev[1] += d * d;
  }
}

// The row's statistics, once the first and second pass sums are added over the row.
template <typename A>
__device__ __forceinline__ RowStats<A> fwd_stats(A shift, const A (&dev)[2], int n, A eps) {
  return corrected_stats(shift, dev[0], dev[1], A(n), eps);
}

template <typename T, typename P, typename Y, int K>
__global__ void __launch_bounds__(512)
    layer_norm_fwd_rows_kernel(const FwdParams<T, P, Y> p, const int group) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  LN_EXT_SHARED(A, scratch, [kSumScratch]);
  const int n = p.cols;
  const int lane = threadIdx.x & (group - 1);
  const int rows_per_block = blockDim.x / group;
  // The batch loop is uniform over the block, so every lane reaches every
  // shuffle / barrier; lanes past the last row work on an empty row.
  for (int64_t batch = static_cast<int64_t>(blockIdx.x) * rows_per_block; batch < p.rows;
       batch += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = batch + threadIdx.x / group;
    const bool valid = row < p.rows;
    const RowChunks rc = valid ? row_chunks<V>(row, n) : RowChunks{0, 0, 0};
    const T* x_row = p.x + rc.first * V;

    A v[K][V];  // this thread's chunks of the row: chunk s = k * group + lane
    A sum = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      if (s < rc.count) {
        load_chunk(x_row + s * V, chunk_is_full<V>(p.vec_ok, col0, n), col0, n, A(0), v[k]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[k][i] = 0;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) sum += v[k][i];
    }
    const A shift = row_group_sum(sum, group, scratch) / A(n);

    A dev[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      // Chunks past the row's end hold zeros: mark them outside the row.
      add_deviations(v[k], s < rc.count ? s * V - rc.head : n, n, shift, dev);
    }
    row_group_sums(dev, group, scratch);
    const RowStats<A> st = fwd_stats(shift, dev, n, p.eps);
    if (valid && lane == 0) {
      p.mean[row] = st.mean();
      p.rstd[row] = st.rstd;
    }

    Y* y_row = p.y + rc.first * V;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      if (s < rc.count) {
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        fwd_write_chunk<V>(p, y_row + s * V, full, full && p.params_vec_ok, col0, v[k], st);
      }
    }
  }
}

template <typename T, typename P, typename Y>
__global__ void __launch_bounds__(1024)
    layer_norm_fwd_long_kernel(const FwdParams<T, P, Y> p, const int cached_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  LN_EXT_SHARED(A, scratch, [kSumScratch]);
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);  // the row's first cached_chunks chunks, [cached_chunks * V] T
  T* cache = reinterpret_cast<T*>(dynamic_smem);
  const int n = p.cols;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowChunks rc = row_chunks<V>(row, n);
    const T* x_row = p.x + rc.first * V;
    // Each thread only ever touches its own chunks s = threadIdx.x + j * blockDim.x,
    // in the cache as in x, so the cache needs no barrier of its own.
    cache_chunks<V, kFwdCacheBatchBytes>(x_row, cache, 0, imin(rc.count, cached_chunks), rc.head, n, p.vec_ok);
    // f(s, col0, full, v) for this thread's chunks s, v = x as acc: from the cache for
    // the chunks it holds, else (again) from x.
    auto for_my_chunks = [&](auto&& f) {
      for_chunks_split(cached_chunks, rc.count, [&](int s, auto cached) {
        const T* src = (cached.value ? cache : x_row) + s * V;
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        A v[V];
        load_chunk(src, full, col0, n, A(0), v);
        f(s, col0, full, v);
      });
    };

    A sum = 0;
    for_my_chunks([&](int, int, bool, const A(&v)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) sum += v[i];
    });
    const A shift = block_sum(sum, scratch) / A(n);

    A dev[2] = {0, 0};
    for_my_chunks([&](int, int col0, bool, const A(&v)[V]) { add_deviations(v, col0, n, shift, dev); });
    block_sums(dev, scratch);
    const RowStats<A> st = fwd_stats(shift, dev, n, p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = st.mean();
      p.rstd[row] = st.rstd;
    }

    Y* y_row = p.y + rc.first * V;
    for_my_chunks([&](int s, int col0, bool full, const A(&v)[V]) {
      fwd_write_chunk<V>(p, y_row + s * V, full, full && p.params_vec_ok, col0, v, st);
    });
    // The next row's cache copy overwrites only this thread's own chunks: no barrier.
  }
}

template <typename T, typename P, typename Y>
__global__ void __launch_bounds__(1024)
    layer_norm_fwd_cluster_kernel(const FwdParams<T, P, Y> p, const int slice_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  // Dynamic shared memory only (the host emulation gives each block of a cluster its
  // own): the header (cluster.cuh), then this block's chunks of the row,
  // [slice_chunks * V] T.
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);
  ClusterSum<A> cluster_sum(dynamic_smem, p.lean_cluster_sum);
  T* const cache = reinterpret_cast<T*>(dynamic_smem + cluster_header_words<A>());
  const int n = p.cols;
  const int rank = cluster_rank();
  const int blocks = cluster_blocks();
  const int64_t clusters = gridDim.x / blocks;

  // Every block of a cluster walks the same rows, so all reach every cluster barrier.
  for (int64_t row = blockIdx.x / blocks; row < p.rows; row += clusters) {
    const RowChunks rc = row_chunks<V>(row, n);
    const int begin = imin(rank * slice_chunks, rc.count);
    const int end = imin(begin + slice_chunks, rc.count);
    const T* x_row = p.x + rc.first * V;
    cache_chunks<V, kFwdCacheBatchBytes>(x_row, cache, begin, end, rc.head, n, p.vec_ok);
    // This thread's chunks s of the row, in the cache at (s - begin) * V: the
    // chunks it cached itself, so no barrier.
    auto for_my_chunks = [&](auto&& f) {
      for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        A v[V];
        load_chunk(cache + (s - begin) * V, full, col0, n, A(0), v);
        f(s, col0, full, v);
      }
    };

    A sum = 0;
    for_my_chunks([&](int, int, bool, const A(&v)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) sum += v[i];
    });
    const A shift = cluster_sum(sum) / A(n);

    A dev[2] = {0, 0};
    for_my_chunks([&](int, int col0, bool, const A(&v)[V]) { add_deviations(v, col0, n, shift, dev); });
    cluster_sum(dev);
    const RowStats<A> st = fwd_stats(shift, dev, n, p.eps);
    if (rank == 0 && threadIdx.x == 0) {
      p.mean[row] = st.mean();
      p.rstd[row] = st.rstd;
    }

    Y* y_row = p.y + rc.first * V;
    for_my_chunks([&](int s, int col0, bool full, const A(&v)[V]) {
      fwd_write_chunk<V>(p, y_row + s * V, full, full && p.params_vec_ok, col0, v, st);
    });
  }
  cluster_sync();  // no block leaves while another may still read its sums
}

}  // namespace kernels
}  // namespace ln_ext
