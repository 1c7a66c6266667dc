// Forward kernels of the norm family (LayerNorm, RMSNorm, each optionally fused with a
// residual add). Device code only; knows nothing of torch.
//
// Computes, for each row of its input u: [M, N], which is x, or h = x + residual (the
// add + norm: h is rounded once to the residual stream's dtype R and written out):
//   LayerNorm (kCentered), by the corrected two-pass algorithm (norm_math.cuh: RowStats)
//   over the on-chip row:
//     m0 = sum(u) / N;  c = sum(u - m0) / N,  var = (sum((u - m0)^2) - N c^2) / N
//     mean = m0 + c,  rstd = 1 / sqrt(var + eps)            (correctly rounded)
//     y    = ((u - m0) - c) * rstd * gain + bias            (weight/bias optional)
//   RMSNorm: rstd = 1 / sqrt(sum(u^2) / N + eps), y = u * rstd * gain (no mean, no bias)
//   gain = weight_offset + weight (a zero-centered weight; the offset is 0 without one)
// accumulating in acc_t<T> (float, or double for double x). mean/rstd: [M]. Reductions per
// row: LayerNorm two (the second adds two values at once), RMSNorm one.
//
// Three families, all reading x (and the residual) from device memory with the chunk
// grid of vec.cuh (16-byte loads/stores of x, per-row peeled head/tail when N % V != 0;
// y, residual and h use the same element index, so a float32 one is 32-byte chunks):
//  * rows kernel: the row lives in registers, K chunks per thread, `group`
//    threads per row (group <= 32: 32/group rows per warp, several rows per
//    block; group > 32: one row per block of `group` threads). Persistent grid
//    stride over batches of rows. x is read exactly once.
//  * long kernel: any N. One row per block; each thread walks its chunks once per
//    pass. The row's first `cached_chunks` chunks (all of it when it fits) are first
//    copied into shared memory as the norm's input (x raw, or h computed there) and the
//    passes read them there; the rest of a longer row is re-read (x or h, from L2).
//  * cluster kernel (sm_90): one row per thread-block cluster (cluster.cuh).
//    Block `rank` caches its slice of the row's chunks in shared memory (read
//    once) and works on it alone; the row's sums are added across the cluster
//    through distributed shared memory. For rows longer than one block's
//    shared memory (bf16 N = 262144 is 512 KB) and to spread few rows over more
//    multiprocessors.
// Assumes: N >= 1, N + 2*V fits in int, group a power of two, blockDim.x a
// multiple of group and of 32, group * K >= max_chunks_per_row(N, V); R is T or, for a
// 16-bit T, float.
// Measured: not yet on a GPU (see benchmarks/NOTES.md for ptxas/SASS facts).
#pragma once

#include <type_traits>

#include "cluster.cuh"
#include "norm_math.cuh"
#include "reduce.cuh"
#include "vec.cuh"

namespace ln_ext {
namespace kernels {

// Bytes of a row each thread loads at once while filling a row cache (cache_chunks).
constexpr int kFwdCacheBatchBytes = 64;

template <typename T, typename P, typename Y, typename R = T>
struct FwdParams {
  const T* x;         // [M, N]
  const R* residual;  // [M, N] or nullptr: no add
  R* h;               // [M, N]: x + residual, the rows normalized (with a residual)
  const P* weight;    // [N] or nullptr (acts as 1)
  const P* bias;      // [N] or nullptr (acts as 0); RMSNorm: nullptr
  Y* y;               // [M, N]
  acc_t<T>* mean;     // [M]; RMSNorm: nullptr
  acc_t<T>* rstd;     // [M]
  int64_t rows;
  int cols;
  acc_t<T> eps;
  bool vec_ok;         // x, y, residual and h 16-byte aligned: full chunks may use vector access
  bool params_vec_ok;  // weight and bias (those present) 16-byte aligned
  bool lean_cluster_sum = false;  // cluster kernel: how ClusterSum meets (cluster.cuh)
  acc_t<T> weight_offset = 0;     // the gain is weight_offset + weight
};

// The raw words of chunk s of a row's x and residual (the first phase of a chunk load, vec.cuh).
template <int V, typename T, typename P, typename Y, typename R>
__device__ __forceinline__ void load_input_words(const FwdParams<T, P, Y, R>& p, int64_t first, int s,
                                                 bool full, T (&x_raw)[V], R (&residual_raw)[V]) {
  const int64_t at = (first + s) * V;
  load_chunk_words<V>(p.x + at, full, x_raw);
  // Zeros without a residual: words left unwritten on a path stay live (load_chunk_words).
  load_chunk_words<V>(p.residual != nullptr ? p.residual + at : nullptr, full && p.residual != nullptr, residual_raw);
}

// Chunk s of the row as the norm's input u (acc), zero outside the row, from the words
// load_input_words loaded: x, or, with a residual, h = x + residual rounded to R, which
// is also stored.
template <int V, typename T, typename P, typename Y, typename R, typename A>
__device__ __forceinline__ void input_chunk(const FwdParams<T, P, Y, R>& p, int64_t first, int s, bool full,
                                            int col0, const T (&x_raw)[V], const R (&residual_raw)[V],
                                            A (&u)[V]) {
  const int64_t at = (first + s) * V;
  convert_chunk(p.x + at, x_raw, full, col0, p.cols, A(0), u);
  if (p.residual == nullptr) return;
  A r[V];
  convert_chunk(p.residual + at, residual_raw, full, col0, p.cols, A(0), r);
#pragma unroll
  for (int i = 0; i < V; ++i) u[i] = to_acc(from_acc<R>(u[i] + r[i]));
  store_chunk(p.h + at, full, col0, p.cols, u);
}

// Both phases for one chunk.
template <int V, typename T, typename P, typename Y, typename R, typename A>
__device__ __forceinline__ void load_input_chunk(const FwdParams<T, P, Y, R>& p, int64_t first, int s,
                                                 bool full, int col0, A (&u)[V]) {
  alignas(16) T x_raw[V];
  alignas(16) R residual_raw[V];
  load_input_words(p, first, s, full, x_raw, residual_raw);
  input_chunk(p, first, s, full, col0, x_raw, residual_raw, u);
}

// y for the chunk's columns from the row's input values u (acc), then store.
template <int V, typename T, typename P, typename Y, typename R, typename A>
__device__ __forceinline__ void fwd_write_chunk(const FwdParams<T, P, Y, R>& p, Y* y_chunk,
                                                bool full, bool params_vec, int col0,
                                                const A (&u)[V], const RowStats<A>& st) {
  A w[V], b[V], out[V];
  load_gain_chunk(p.weight, A(p.weight_offset), params_vec, col0, p.cols, w);
  load_param_chunk(p.bias, params_vec, col0, p.cols, A(0), b);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = st.xhat(u[i]) * w[i] + b[i];
  store_chunk(y_chunk, full, col0, p.cols, out);
}

// The row's statistics. for_chunks(visit) calls visit(col0, u) for each of this
// thread's chunks of the row (u zero outside it); sum_over_row(v) adds the values of
// v[K] over every thread of the row.
template <bool kCentered, int V, typename A, typename ForChunks, typename SumOverRow>
__device__ __forceinline__ RowStats<A> row_stats(ForChunks&& for_chunks, SumOverRow&& sum_over_row, int n,
                                                 A eps) {
  if constexpr (kCentered) {
    A sum[1] = {0};
    for_chunks([&](int, const A(&u)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) sum[0] += u[i];
    });
    sum_over_row(sum);
    const A shift = sum[0] / A(n);
    A dev[2] = {0, 0};  // sum(u - shift), sum((u - shift)^2) over the row's columns
    for_chunks([&](int col0, const A(&u)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A d = in_row(col0 + i, n) ? u[i] - shift : A(0);
        dev[0] += d;
        dev[1] += d * d;
      }
    });
    sum_over_row(dev);
    return corrected_stats(shift, dev[0], dev[1], A(n), eps);
  } else {
    A sq[1] = {0};
    for_chunks([&](int, const A(&u)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) sq[0] += u[i] * u[i];
    });
    sum_over_row(sq);
    return {A(0), A(0), inv_sqrt(sq[0] / A(n) + eps)};
  }
}

template <typename T, typename P, typename Y, typename R>
__device__ __forceinline__ void store_stats(const FwdParams<T, P, Y, R>& p, int64_t row,
                                            const RowStats<acc_t<T>>& st) {
  if (p.mean != nullptr) p.mean[row] = st.mean();
  p.rstd[row] = st.rstd;
}

// Fills `cache` (chunk s at (s - begin) * V) with chunks [begin, end) of the row's
// input: x copied raw, or h = x + residual (also stored to h); with a residual, chunks
// [end, stop) get their h stored only (a long kernel's uncached part, re-read from h).
// Each thread handles the chunks it later works on itself: no barrier.
template <int V, typename T, typename P, typename Y, typename R>
__device__ __forceinline__ void fill_input(const FwdParams<T, P, Y, R>& p, const RowChunks& rc, R* cache,
                                           int begin, int end, int stop) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, R>) {
    if (p.residual == nullptr) {
      cache_chunks<V, kFwdCacheBatchBytes>(p.x + rc.first * V, cache, begin, end, rc.head, p.cols, p.vec_ok);
      return;
    }
  }
  for (int s = begin + static_cast<int>(threadIdx.x); s < stop; s += static_cast<int>(blockDim.x)) {
    const int col0 = s * V - rc.head;
    const bool full = chunk_is_full<V>(p.vec_ok, col0, p.cols);
    A u[V];
    load_input_chunk(p, rc.first, s, full, col0, u);
    if (s < end) store_chunk(cache + (s - begin) * V, full, col0, p.cols, u);
  }
}

// Launch bounds of the rows kernel: K=1 runs kMultiRowBlock threads, resident
// `fwd_rows_min_blocks` blocks per multiprocessor (the most whose share of registers
// holds the two-phase loads without spills, sm_90, measured: float 40, 16-bit 48, double
// 48 and, centered, 64); K=4 up to 512 threads, one block. Without a minimum ptxas sized
// K=1 for 512-thread blocks and took up to 64 registers.
template <typename T, bool kCentered, int K>
constexpr int fwd_rows_min_blocks() {
  if constexpr (K != 1) return 1;
  if constexpr (sizeof(T) == 4) return 6;
  return sizeof(T) == 8 && kCentered ? 4 : 5;
}

template <typename T, typename P, typename Y, typename R, bool kCentered, int K>
__global__ void __launch_bounds__(K == 1 ? kMultiRowBlock : 512, (fwd_rows_min_blocks<T, kCentered, K>()))
    layer_norm_fwd_rows_kernel(const FwdParams<T, P, Y, R> p, const int group) {
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

    // This thread's chunks s = k * group + lane of the row's input, in two phases: every
    // 16-byte load of x and the residual first, then the conversions (and h stores, which
    // thus never stand before a load of the row: without __restrict__ they would order it).
    alignas(16) T x_raw[K][V];
    alignas(16) R residual_raw[K][V];
    bool full[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      full[k] = s < rc.count && chunk_is_full<V>(p.vec_ok, s * V - rc.head, n);
      load_input_words(p, rc.first, s, full[k], x_raw[k], residual_raw[k]);
    }
    A u[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      if (s < rc.count) {
        input_chunk(p, rc.first, s, full[k], col0, x_raw[k], residual_raw[k], u[k]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) u[k][i] = 0;
      }
    }
    const RowStats<A> st = row_stats<kCentered, V>(
        [&](auto&& visit) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int s = k * group + lane;
            visit(s < rc.count ? s * V - rc.head : n, u[k]);  // chunks past the row: outside it
          }
        },
        [&](auto& v) { row_group_sums(v, group, scratch); }, n, p.eps);
    if (valid && lane == 0) store_stats(p, row, st);

    Y* y_row = p.y + rc.first * V;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      if (s < rc.count) fwd_write_chunk<V>(p, y_row + s * V, full[k], full[k] && p.params_vec_ok, col0, u[k], st);
    }
  }
}

template <typename T, typename P, typename Y, typename R, bool kCentered>
__global__ void __launch_bounds__(1024)
    layer_norm_fwd_long_kernel(const FwdParams<T, P, Y, R> p, const int cached_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  LN_EXT_SHARED(A, scratch, [kSumScratch]);
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);  // the row's first cached_chunks chunks of its input, [cached_chunks * V] R
  R* cache = reinterpret_cast<R*>(dynamic_smem);
  const int n = p.cols;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowChunks rc = row_chunks<V>(row, n);
    // Each thread only ever touches its own chunks s = threadIdx.x + j * blockDim.x,
    // in the cache as in memory, so the cache needs no barrier of its own.
    fill_input<V>(p, rc, cache, 0, imin(rc.count, cached_chunks), rc.count);
    // The input beyond the cache: h (just written) with a residual, else x.
    const R* input_row;
    if constexpr (std::is_same_v<T, R>) {
      input_row = (p.residual != nullptr ? p.h : p.x) + rc.first * V;
    } else {
      input_row = p.h + rc.first * V;
    }
    // f(s, col0, full, u) for this thread's chunks s, u = the input as acc: from the cache
    // for the chunks it holds, else (again) from memory.
    auto for_my_chunks = [&](auto&& f) {
      for_chunks_split(cached_chunks, rc.count, [&](int s, auto cached) {
        const R* src = (cached.value ? cache : input_row) + s * V;
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        A u[V];
        load_chunk(src, full, col0, n, A(0), u);
        f(s, col0, full, u);
      });
    };
    const RowStats<A> st = row_stats<kCentered, V>(
        [&](auto&& visit) { for_my_chunks([&](int, int col0, bool, const A(&u)[V]) { visit(col0, u); }); },
        [&](auto& v) { block_sums(v, scratch); }, n, p.eps);
    if (threadIdx.x == 0) store_stats(p, row, st);

    Y* y_row = p.y + rc.first * V;
    for_my_chunks([&](int s, int col0, bool full, const A(&u)[V]) {
      fwd_write_chunk<V>(p, y_row + s * V, full, full && p.params_vec_ok, col0, u, st);
    });
    // The next row's cache fill overwrites only this thread's own chunks: no barrier.
  }
}

template <typename T, typename P, typename Y, typename R, bool kCentered>
__global__ void __launch_bounds__(1024)
    layer_norm_fwd_cluster_kernel(const FwdParams<T, P, Y, R> p, const int slice_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  // Dynamic shared memory only (the host emulation gives each block of a cluster its
  // own): the header (cluster.cuh), then this block's chunks of the row's input,
  // [slice_chunks * V] R.
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);
  ClusterSum<A> cluster_sum(dynamic_smem, p.lean_cluster_sum);
  R* const cache = reinterpret_cast<R*>(dynamic_smem + cluster_header_words<A>());
  const int n = p.cols;
  const int rank = cluster_rank();
  const int blocks = cluster_blocks();
  const int64_t clusters = gridDim.x / blocks;

  // Every block of a cluster walks the same rows, so all reach every cluster barrier.
  for (int64_t row = blockIdx.x / blocks; row < p.rows; row += clusters) {
    const RowChunks rc = row_chunks<V>(row, n);
    const int begin = imin(rank * slice_chunks, rc.count);
    const int end = imin(begin + slice_chunks, rc.count);
    fill_input<V>(p, rc, cache, begin, end, end);
    // This thread's chunks s of the row, in the cache at (s - begin) * V: the
    // chunks it filled itself, so no barrier.
    auto for_my_chunks = [&](auto&& f) {
      for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        A u[V];
        load_chunk(cache + (s - begin) * V, full, col0, n, A(0), u);
        f(s, col0, full, u);
      }
    };
    const RowStats<A> st = row_stats<kCentered, V>(
        [&](auto&& visit) { for_my_chunks([&](int, int col0, bool, const A(&u)[V]) { visit(col0, u); }); },
        [&](auto& v) { cluster_sum(v); }, n, p.eps);
    if (rank == 0 && threadIdx.x == 0) store_stats(p, row, st);

    Y* y_row = p.y + rc.first * V;
    for_my_chunks([&](int s, int col0, bool full, const A(&u)[V]) {
      fwd_write_chunk<V>(p, y_row + s * V, full, full && p.params_vec_ok, col0, u, st);
    });
  }
  cluster_sync();  // no block leaves while another may still read its sums
}

}  // namespace kernels
}  // namespace ln_ext
