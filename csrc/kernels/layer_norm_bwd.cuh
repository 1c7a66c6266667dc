// LayerNorm backward kernels. Device code only; knows nothing of torch.
//
// Backward kernels of the norm family: the gradient of the norm's input x (for an add +
// norm, x is h = x + residual, and the gradient of h from outside, dh, is added to dx).
// With g = dy * gain, gain = weight_offset + weight (weight absent: g = dy), and xhat from
// the stored mean and rstd:
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   per row (layer_norm_dx)
//              dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
//   RMSNorm (kCentered false): xhat = x * rstd, dx = rstd * (g - xhat * mean(g * xhat)),
//              dweight as above, no dbias
// accumulating in acc_t<T>. xhat is not (x - mean) * rstd: the stored float mean
// carries a rounding error of up to half an ulp of a mean that may be far larger than
// the row's spread, which x - mean turns into a shift of every xhat. Each kernel sums
// d = x - mean over the row, and xhat = (d - c) * rstd with the residual c = sum(d) / N
// (norm_math.cuh: RowStats), so the gradients do not depend on how well the mean was
// rounded. No floating-point atomics: dweight/dbias are summed
// as per-block partials [blocks, 2, N] (dweight sums, then dbias sums), which a
// second kernel adds in block order, so every bit is reproducible run to run.
//
// Families (x and dy always through the chunk grid of vec.cuh):
//  * rows kernel: x and dy of a row live in registers (K chunks per thread,
//    `group` threads per row as in the forward rows kernel); one read of x and
//    dy, writes dx. Two reductions per row: sum(d), then sum(g) and sum(g xhat). When `partials` is set each thread also sums dy*xhat and dy
//    over all its rows in registers, for columns that stay the same from row to
//    row: when every row starts on a chunk (N % V == 0) those of its own chunks;
//    otherwise (the row's chunks start `head` columns early, head varying by
//    row) the group first writes the row's dy*xhat and dy in chunk order to a
//    staging row in shared memory and each thread then adds the columns
//    lane + m * group (bank-conflict-free reads). The block adds its row groups
//    in group order and writes one partial row. Everything is read exactly once.
//  * long kernel: any N, one row per block. x and dy are cached raw in shared
//    memory, as much of the row as fits (read once), the rest re-read (L2).
//    One reduction per row: sum(d), sum(g), sum(g d), from which sum(g xhat) follows.
//    When `partials` is set, the block's dweight/dbias sums [2, N] live in
//    shared memory ahead of the cache, column j owned by thread j % blockDim.x
//    (x and dy read from the cache or L2 once more). When `residual` is set, the
//    row's c is written for the param_cols kernel (dx and partials may be absent).
//  * cluster kernel (sm_90): one row per thread-block cluster (cluster.cuh).
//    Block `rank` caches x and dy of its slice of the row's chunks (and the chunk
//    after it) in shared memory, adds the slice's share of the row's two sums
//    into cluster-wide sums (distributed shared memory), and writes its dx. When
//    `partials` is set it also owns the dweight/dbias sums of the columns
//    [rank * slice_chunks * V, (rank + 1) * slice_chunks * V) in shared memory:
//    rows too long for one block's sums (bf16 N >= 32768) keep the 3·M·N traffic.
//  * param_cols kernel: dweight/dbias of rows too long for those sums to fit in
//    shared memory: column-parallel sums over a slice of rows per block;
//    re-reads x and dy (coalesced scalar loads) and the rows' residuals c.
//  * param_reduce kernel: adds the [blocks, 2, N] partials in block order and
//    converts to the parameter dtype.
// Assumes: N >= 1, N + 2*V fits in int, same launch shape rules as the forward.
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
constexpr int kBwdCacheBatchBytes = 32;

template <typename T, typename DY, typename P>
struct BwdParams {
  const T* dh;            // [M, N] or nullptr: added to dx (the gradient of h, add + norm)
  const DY* dy;           // [M, N]
  const T* x;             // [M, N]
  const acc_t<T>* mean;   // [M]; RMSNorm: nullptr
  const acc_t<T>* rstd;   // [M]
  const P* weight;        // [N] or nullptr (acts as 1)
  T* dx;                  // [M, N] or nullptr (not requested)
  acc_t<T>* partials;     // [gridDim.x, 2, N] or nullptr (dweight/dbias not fused)
  acc_t<T>* residual;     // [M] or nullptr: each row's c, for the param_cols kernel
  int64_t rows;
  int cols;
  bool vec_ok;         // x, dy and dx 16-byte aligned
  bool weight_vec_ok;  // weight (if present) 16-byte aligned
  bool lean_cluster_sum = false;  // cluster kernel: how ClusterSum meets (cluster.cuh)
  acc_t<T> weight_offset = 0;     // g = dy * (weight_offset + weight)
};

// out += the chunk's dh (the gradient of h from outside the norm), when there is one,
// from its words `dh_raw` loaded ahead (load_chunk_words) when the chunk is full.
template <int V, typename T, typename DY, typename P, typename A>
__device__ __forceinline__ void add_grad_h(const BwdParams<T, DY, P>& p, int64_t chunk, bool full, int col0,
                                           const T (&dh_raw)[V], A (&out)[V]) {
  if (p.dh == nullptr) return;
  A dh[V];
  convert_chunk(p.dh + chunk * V, dh_raw, full, col0, p.cols, A(0), dh);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] += dh[i];
}

// The first phase of reading the chunk's dh: its words, zeros without a dh (words left
// unwritten on a path stay live: load_chunk_words).
template <int V, typename T, typename DY, typename P>
__device__ __forceinline__ void load_grad_h_words(const BwdParams<T, DY, P>& p, int64_t chunk, bool full,
                                                  T (&dh_raw)[V]) {
  load_chunk_words<V>(p.dh != nullptr ? p.dh + chunk * V : nullptr, full && p.dh != nullptr, dh_raw);
}

// Launch bounds of the rows kernel: K=1 runs kMultiRowBlock threads, resident
// `bwd_rows_min_blocks` blocks per multiprocessor; K=2 up to 512 threads, one block.
// Without a minimum, ptxas sized the K=1 kernels for 512-thread blocks: it kept them
// at 64 registers, where the centered 16-bit ones spilled (dbias sums, the sum(d)
// reduction, float weights: ~70 live), and past 64 it took up to 128. The minimums are
// the most blocks whose share of registers holds each kernel (with the two-phase loads)
// without spills (sm_90, measured): float 48 and, centered, 64 registers; 16-bit and
// double 64 and, centered, 80.
template <typename T, bool kCentered, int K>
constexpr int bwd_rows_min_blocks() {
  if constexpr (K != 1) return 1;
  if constexpr (sizeof(T) == 4) return kCentered ? 4 : 5;
  return kCentered ? 3 : 4;
}

template <typename T, typename DY, typename P, bool kCentered, int K>
__global__ void __launch_bounds__(K == 1 ? kMultiRowBlock : 512, (bwd_rows_min_blocks<T, kCentered, K>()))
    layer_norm_bwd_rows_kernel(const BwdParams<T, DY, P> p, const int group) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  LN_EXT_SHARED(A, scratch, [kSumScratch]);
  const int n = p.cols;
  const int lane = threadIdx.x & (group - 1);
  const int rows_per_block = blockDim.x / group;
  const bool fused_params = p.partials != nullptr;
  // Rows not all starting on a chunk: dweight/dbias go through the staging row.
  const bool staged = fused_params && n % V != 0;
  // Dynamic shared memory: staged, per row group [2][stage_len] (dy*xhat, dy in
  // chunk order); after the row loop, [rows_per_block, N] to add the groups.
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);
  const int stage_len = max_chunks_per_row(n, V) * V;
  A* const stage_dw = reinterpret_cast<A*>(dynamic_smem) + (threadIdx.x / group) * 2 * stage_len;
  A* const stage_db = stage_dw + stage_len;
  // The column of accumulator [k][i]; every column < N has exactly one (k, i, lane).
  auto column = [&](int k, int i) {
    return staged ? lane + (k * V + i) * group : (k * group + lane) * V + i;
  };
  // f(k, i, column) for each of this thread's accumulators whose column is in the row
  // (forced inline: without it ptxas spilled the 16-bit K=1 kernels at 64 registers).
  auto for_each_column = [&](auto&& f) __attribute__((always_inline)) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int col = column(k, i);
        if (col < n) f(k, i, col);
      }
    }
  };

  A acc_dw[K][V], acc_db[K][V];  // fused_params: sums for this thread's columns column(k, i)
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < V; ++i) acc_dw[k][i] = acc_db[k][i] = 0;
  }

  // Uniform batch loop as in the forward rows kernel.
  for (int64_t batch = static_cast<int64_t>(blockIdx.x) * rows_per_block; batch < p.rows;
       batch += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = batch + threadIdx.x / group;
    const bool valid = row < p.rows;
    const RowChunks rc = valid ? row_chunks<V>(row, n) : RowChunks{0, 0, 0};
    const A mean = kCentered && valid ? p.mean[row] : A(0);
    const A rstd = valid ? p.rstd[row] : A(0);
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;

    // This thread's chunks s = k * group + lane, in two phases (vec.cuh): every 16-byte
    // load of x, dy and dh first, then the conversions. dh waits in its raw words for
    // the dx stores, so that it is not read chunk by chunk behind them.
    alignas(16) T x_raw[K][V], dh_raw[K][V];
    alignas(16) DY dy_raw[K][V];
    bool full[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      full[k] = s < rc.count && chunk_is_full<V>(p.vec_ok, s * V - rc.head, n);
      load_chunk_words<V>(x_row + s * V, full[k], x_raw[k]);
      load_chunk_words<V>(dy_row + s * V, full[k], dy_raw[k]);
      load_grad_h_words(p, rc.first + s, full[k], dh_raw[k]);
    }
    // d = x - mean then xhat, dy then g; zero outside the row.
    A xhat[K][V], g[K][V];
    A sum_d = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      if (s < rc.count) {
        convert_chunk(x_row + s * V, x_raw[k], full[k], col0, n, A(0), xhat[k]);
        convert_chunk(dy_row + s * V, dy_raw[k], full[k], col0, n, A(0), g[k]);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          xhat[k][i] = in_row(col0 + i, n) ? xhat[k][i] - mean : A(0);
          sum_d += xhat[k][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) xhat[k][i] = g[k][i] = 0;
      }
    }
    // RMSNorm: no mean, so no residual of it either.
    A residual = 0;
    if constexpr (kCentered) residual = row_group_sum(sum_d, group, scratch) / A(n);
    const RowStats<A> st{mean, residual, rstd};

    A sums[2] = {0, 0};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      A w[V];
      if (s < rc.count) {
        load_gain_chunk(p.weight, A(p.weight_offset), full[k] && p.weight_vec_ok, col0, n, w);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          xhat[k][i] = in_row(col0 + i, n) ? (xhat[k][i] - st.residual) * rstd : A(0);
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) w[i] = 0;
      }
      if (staged && s < rc.count) {  // zeros outside the row are never read back
        alignas(16) A dw[V], db[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          dw[i] = g[k][i] * xhat[k][i];
          db[i] = g[k][i];
        }
        store_words<V>(stage_dw + s * V, dw);
        if constexpr (kCentered) store_words<V>(stage_db + s * V, db);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A dy = g[k][i];
        if (fused_params && !staged) {  // chunk-aligned rows: column s*V + i
          acc_dw[k][i] += dy * xhat[k][i];
          if constexpr (kCentered) acc_db[k][i] += dy;
        }
        g[k][i] = dy * w[i];
        if constexpr (kCentered) sums[0] += g[k][i];  // RMSNorm: no mean(g) taken out
        sums[1] += g[k][i] * xhat[k][i];
      }
    }
    if (staged) {
      row_group_sync(group);  // the group's staging row is complete
      if (valid) {
        for_each_column([&](int k, int i, int col) {
          acc_dw[k][i] += stage_dw[rc.head + col];  // column col of the row
          if constexpr (kCentered) acc_db[k][i] += stage_db[rc.head + col];
        });
      }
      row_group_sync(group);  // read before the next row overwrites it
    }
    row_group_sums(sums, group, scratch);

    if (p.dx != nullptr) {
      T* dx_row = p.dx + rc.first * V;
      const A rstd_n = rstd / A(n);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int s = k * group + lane;
        const int col0 = s * V - rc.head;
        if (s < rc.count) {
          A out[V];
#pragma unroll
          for (int i = 0; i < V; ++i) out[i] = layer_norm_dx(g[k][i], xhat[k][i], A(n), sums[0], sums[1], rstd_n);
          add_grad_h(p, rc.first + s, full[k], col0, dh_raw[k], out);
          store_chunk(dx_row + s * V, full[k], col0, n, out);
        }
      }
    }
  }

  if (!fused_params) return;
  // This block's partial sums: the row groups added in group order.
  // rows_per_block == 1 writes straight from registers; otherwise through
  // shared memory [rows_per_block, N] (the launcher sizes it).
  A* block_partial = p.partials + static_cast<int64_t>(blockIdx.x) * 2 * n;
  if (rows_per_block == 1) {
    // K == 1 rows come in groups of <= 32 lanes, several per block (not here); leaving
    // this out of K == 1 keeps its 64-register bound free of spills.
    if (K != 1 && !staged) {
      // n % V == 0: a thread's V columns of chunk k are contiguous and whole, and
      // block_partial + col0 is 16-byte aligned (V acc values are whole 16-byte words):
      // 16-byte stores, lanes contiguous, instead of V 32/64-bit stores lanes V apart.
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int col0 = (k * group + lane) * V;
        if (col0 >= n) continue;
        alignas(16) A words[V];
#pragma unroll
        for (int i = 0; i < V; ++i) words[i] = acc_dw[k][i];
        store_words<V>(block_partial + col0, words);
        if constexpr (kCentered) {
#pragma unroll
          for (int i = 0; i < V; ++i) words[i] = acc_db[k][i];
          store_words<V>(block_partial + n + col0, words);
        }
      }
      return;
    }
    for_each_column([&](int k, int i, int col) {
      block_partial[col] = acc_dw[k][i];
      if constexpr (kCentered) block_partial[n + col] = acc_db[k][i];
    });
    return;
  }
  A* groups = reinterpret_cast<A*>(dynamic_smem);  // [rows_per_block, n]
  A* group_row = groups + (threadIdx.x / group) * n;
  __syncthreads();  // staged: every group is done with its staging row
  constexpr int kParamGrads = kCentered ? 2 : 1;  // dweight, dbias (RMSNorm: no bias)
#pragma unroll
  for (int which = 0; which < kParamGrads; ++which) {
    for_each_column([&](int k, int i, int col) {
      group_row[col] = which == 0 ? acc_dw[k][i] : acc_db[k][i];
    });
    __syncthreads();
    for (int col = threadIdx.x; col < n; col += blockDim.x) {
      A total = 0;
      for (int r = 0; r < rows_per_block; ++r) total += groups[r * n + col];
      block_partial[which * n + col] = total;
    }
    __syncthreads();
  }
}

// Columns of the long kernel's dweight/dbias sums in shared memory, rounded so
// that the row cache behind them starts 16-byte aligned.
__host__ __device__ constexpr int long_param_cols(int n) { return (n + 3) / 4 * 4; }

template <typename T, typename DY, typename P, bool kCentered>
__global__ void __launch_bounds__(1024)
    layer_norm_bwd_long_kernel(const BwdParams<T, DY, P> p, const int cached_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  LN_EXT_SHARED(A, scratch, [kSumScratch]);
  // Dynamic shared memory: partials set: [2, long_param_cols(n)] A (dweight, dbias
  // sums of this block's rows); then the row's first cached_chunks chunks of x and
  // of dy: [cached_chunks * V] T, [cached_chunks * V] DY.
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);
  const int n = p.cols;
  const bool fused_params = p.partials != nullptr;
  A* const sum_dw = reinterpret_cast<A*>(dynamic_smem);
  A* const sum_db = sum_dw + long_param_cols(n);
  T* x_cache = reinterpret_cast<T*>(fused_params ? sum_db + long_param_cols(n) : sum_dw);
  DY* dy_cache = reinterpret_cast<DY*>(x_cache + cached_chunks * V);  // 16-byte aligned: V*sizeof(T) == 16
  // Column j's sums belong to thread j % blockDim.x in every row: no barrier needed.
  if (fused_params) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum_dw[j] = sum_db[j] = 0;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowChunks rc = row_chunks<V>(row, n);
    const A mean = kCentered ? p.mean[row] : A(0);
    const A rstd = p.rstd[row];
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;
    // The previous row's column pass read chunks that other threads cache.
    if (fused_params && cached_chunks > 0) __syncthreads();
    // As in the forward long kernel, the chunk passes touch a thread's own chunks only.
    const int cache_end = imin(rc.count, cached_chunks);
    cache_chunks<V, kBwdCacheBatchBytes>(x_row, x_cache, 0, cache_end, rc.head, n, p.vec_ok);
    cache_chunks<V, kBwdCacheBatchBytes>(dy_row, dy_cache, 0, cache_end, rc.head, n, p.vec_ok);

    // f(s, col0, full, d, dy, w, dh_raw) for this thread's chunks: d = x - mean and dy,
    // zero outside the row, and the weight. From the cache below cache_end, from memory
    // beyond (two loops, so that each load is a plain shared or global one). `grad_h`
    // true: dh_raw holds the chunk's dh words (load_grad_h_words), loaded first, with x,
    // dy and the weight, not behind the dx math and the previous chunk's dx store.
    auto for_my_chunks = [&](auto grad_h, auto&& f) {
      for_chunks_split(cache_end, rc.count, [&](int s, auto cached) {
        const T* xs = (cached.value ? x_cache : x_row) + s * V;
        const DY* dys = (cached.value ? dy_cache : dy_row) + s * V;
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        alignas(16) T dh_raw[V];
        if constexpr (decltype(grad_h)::value) load_grad_h_words(p, rc.first + s, full, dh_raw);
        A d[V], dy[V], w[V];
        load_chunk(xs, full, col0, n, A(0), d);
        load_chunk(dys, full, col0, n, A(0), dy);
        load_gain_chunk(p.weight, A(p.weight_offset), full && p.weight_vec_ok, col0, n, w);
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = in_row(col0 + i, n) ? d[i] - mean : A(0);
        f(s, col0, full, d, dy, w, dh_raw);
      });
    };

    if (p.dx == nullptr && !fused_params) {  // only the residual (LayerNorm), for param_cols: x alone
      A sum_d = 0;
      for (int s = threadIdx.x; s < rc.count; s += blockDim.x) {
        const int col0 = s * V - rc.head;
        A d[V];
        load_chunk(x_row + s * V, chunk_is_full<V>(p.vec_ok, col0, n), col0, n, A(0), d);
#pragma unroll
        for (int i = 0; i < V; ++i) sum_d += in_row(col0 + i, n) ? d[i] - mean : A(0);
      }
      sum_d = block_sum(sum_d, scratch);
      if (threadIdx.x == 0) p.residual[row] = sum_d / A(n);
      continue;
    }
    A sums[3] = {0, 0, 0};  // sum(d), sum(g), sum(g * d)
    for_my_chunks(std::false_type{}, [&](int, int, bool, const A(&d)[V], const A(&dy)[V], const A(&w)[V],
                                         const T(&)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A g = dy[i] * w[i];
        sums[0] += d[i];
        sums[1] += g;
        sums[2] += g * d[i];
      }
    });
    block_sums(sums, scratch);  // its barrier also completes the cache for the column pass
    const RowStats<A> st{mean, kCentered ? sums[0] / A(n) : A(0), rstd};  // RMSNorm: no mean
    if (p.residual != nullptr && threadIdx.x == 0) p.residual[row] = st.residual;

    if (fused_params) {  // column j of the row is element head + j of its chunks
      const int cached_cols = imin(imax(cache_end * V - rc.head, 0), n);
      auto add_column = [&](int j, const T* xs, const DY* dys) {
        const A dy = to_acc(dys[rc.head + j]);
        sum_dw[j] += dy * st.xhat(to_acc(xs[rc.head + j]));
        sum_db[j] += dy;
      };
      int j = threadIdx.x;
      for (; j < cached_cols; j += blockDim.x) add_column(j, x_cache, dy_cache);
      for (; j < n; j += blockDim.x) add_column(j, x_row, dy_row);
    }
    if (p.dx == nullptr) continue;

    const A sum_g = kCentered ? sums[1] : A(0), sum_gx = rstd * (sums[2] - st.residual * sums[1]);
    const A rstd_n = rstd / A(n);
    T* dx_row = p.dx + rc.first * V;
    for_my_chunks(std::true_type{}, [&](int s, int col0, bool full, const A(&d)[V], const A(&dy)[V], const A(&w)[V],
                                        const T(&dh_raw)[V]) {
      A out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = in_row(col0 + i, n) ? (d[i] - st.residual) * rstd : A(0);
        out[i] = layer_norm_dx(dy[i] * w[i], xhat, A(n), sum_g, sum_gx, rstd_n);
      }
      add_grad_h(p, rc.first + s, full, col0, dh_raw, out);
      store_chunk(dx_row + s * V, full, col0, n, out);
    });
  }

  if (fused_params) {
    A* block_partial = p.partials + static_cast<int64_t>(blockIdx.x) * 2 * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      block_partial[j] = sum_dw[j];
      block_partial[n + j] = sum_db[j];
    }
  }
}

template <typename T, typename DY, typename P, bool kCentered>
__global__ void __launch_bounds__(1024)
    layer_norm_bwd_cluster_kernel(const BwdParams<T, DY, P> p, const int slice_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  // Dynamic shared memory only (see the forward cluster kernel): the header
  // (cluster.cuh); partials set: dweight/dbias sums of this block's columns
  // [2][long_param_cols(slice_chunks * V)] A; then x and dy of this block's chunks
  // and the one after them, [(slice_chunks + 1) * V] T and DY.
  LN_EXT_DYNAMIC_SHARED(dynamic_smem);
  ClusterSum<A> cluster_sum(dynamic_smem, p.lean_cluster_sum);
  const int n = p.cols;
  const bool fused_params = p.partials != nullptr;
  const int rank = cluster_rank();
  const int blocks = cluster_blocks();
  const int64_t clusters = gridDim.x / blocks;
  const int slice_cols = slice_chunks * V;
  const int col_begin = imin(rank * slice_cols, n);
  const int col_end = imin(col_begin + slice_cols, n);
  A* const sum_dw = reinterpret_cast<A*>(dynamic_smem + cluster_header_words<A>());
  A* const sum_db = sum_dw + long_param_cols(slice_cols);
  T* const x_cache = reinterpret_cast<T*>(fused_params ? sum_db + long_param_cols(slice_cols) : sum_dw);
  DY* const dy_cache = reinterpret_cast<DY*>(x_cache + (slice_chunks + 1) * V);
  if (fused_params) {  // column j's sums belong to thread (j - col_begin) % blockDim.x
    for (int j = threadIdx.x; j < col_end - col_begin; j += blockDim.x) sum_dw[j] = sum_db[j] = 0;
  }

  for (int64_t row = blockIdx.x / blocks; row < p.rows; row += clusters) {
    const RowChunks rc = row_chunks<V>(row, n);
    const A mean = kCentered ? p.mean[row] : A(0);
    const A rstd = p.rstd[row];
    const int begin = imin(rank * slice_chunks, rc.count);
    const int end = imin(begin + slice_chunks, rc.count);
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;
    // The previous row's column pass read chunks that other threads cache.
    if (fused_params) __syncthreads();
    // This block's dweight/dbias columns end up to `head` elements into chunk `end`:
    // the column pass needs it cached too.
    const int cache_end = fused_params ? imin(end + 1, rc.count) : end;
    cache_chunks<V, kBwdCacheBatchBytes>(x_row, x_cache, begin, cache_end, rc.head, n, p.vec_ok);
    cache_chunks<V, kBwdCacheBatchBytes>(dy_row, dy_cache, begin, cache_end, rc.head, n, p.vec_ok);

    // f(s, col0, full, d, dy, w, dh_raw) for this thread's chunks s (the ones it cached):
    // d = x - mean and dy, zero outside the row, the weight, and with `grad_h` the chunk's
    // dh words, as in the long kernel.
    auto for_my_chunks = [&](auto grad_h, auto&& f) {
      for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        alignas(16) T dh_raw[V];
        if constexpr (decltype(grad_h)::value) load_grad_h_words(p, rc.first + s, full, dh_raw);
        A d[V], dy[V], w[V];
        load_chunk(x_cache + (s - begin) * V, full, col0, n, A(0), d);
        load_chunk(dy_cache + (s - begin) * V, full, col0, n, A(0), dy);
        load_gain_chunk(p.weight, A(p.weight_offset), full && p.weight_vec_ok, col0, n, w);
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = in_row(col0 + i, n) ? d[i] - mean : A(0);
        f(s, col0, full, d, dy, w, dh_raw);
      }
    };

    A sums[3] = {0, 0, 0};  // sum(d), sum(g), sum(g * d)
    for_my_chunks(std::false_type{}, [&](int, int, bool, const A(&d)[V], const A(&dy)[V], const A(&w)[V],
                                         const T(&)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A g = dy[i] * w[i];
        sums[0] += d[i];
        sums[1] += g;
        sums[2] += g * d[i];
      }
    });
    cluster_sum(sums);  // its block barrier also completes the cache for the column pass
    const RowStats<A> st{mean, kCentered ? sums[0] / A(n) : A(0), rstd};  // RMSNorm: no mean
    if (p.residual != nullptr && rank == 0 && threadIdx.x == 0) p.residual[row] = st.residual;

    if (fused_params) {  // column j is element head + j of the row's chunks
      for (int j = col_begin + threadIdx.x; j < col_end; j += blockDim.x) {
        const int e = rc.head + j - begin * V;
        const A dy = to_acc(dy_cache[e]);
        sum_dw[j - col_begin] += dy * st.xhat(to_acc(x_cache[e]));
        sum_db[j - col_begin] += dy;
      }
    }
    if (p.dx == nullptr) continue;

    const A sum_g = kCentered ? sums[1] : A(0), sum_gx = rstd * (sums[2] - st.residual * sums[1]);
    const A rstd_n = rstd / A(n);
    T* dx_row = p.dx + rc.first * V;
    for_my_chunks(std::true_type{}, [&](int s, int col0, bool full, const A(&d)[V], const A(&dy)[V], const A(&w)[V],
                                        const T(&dh_raw)[V]) {
      A out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = in_row(col0 + i, n) ? (d[i] - st.residual) * rstd : A(0);
        out[i] = layer_norm_dx(dy[i] * w[i], xhat, A(n), sum_g, sum_gx, rstd_n);
      }
      add_grad_h(p, rc.first + s, full, col0, dh_raw, out);
      store_chunk(dx_row + s * V, full, col0, n, out);
    });
  }

  if (fused_params) {  // one partial row per cluster, each block its columns
    A* cluster_partial = p.partials + (blockIdx.x / blocks) * 2 * static_cast<int64_t>(n);
    for (int j = col_begin + threadIdx.x; j < col_end; j += blockDim.x) {
      cluster_partial[j] = sum_dw[j - col_begin];
      cluster_partial[n + j] = sum_db[j - col_begin];
    }
  }
  cluster_sync();  // no block leaves while another may still read its sums
}

// Block (kColTile, kColRowLanes): threadIdx.x picks the column inside a tile of
// kColTile columns, threadIdx.y a row lane; block (bx, by) sums rows
// [by * rows_per_slice, (by + 1) * rows_per_slice) of columns bx * kColTile + tx.
constexpr int kColTile = 32;
constexpr int kColRowLanes = 8;

template <typename T, typename DY>
__global__ void __launch_bounds__(kColTile* kColRowLanes)
    layer_norm_bwd_param_cols_kernel(const DY* __restrict__ dy, const T* __restrict__ x,
                                     const acc_t<T>* __restrict__ mean,  // [M]; RMSNorm: nullptr
                                     const acc_t<T>* __restrict__ rstd,
                                     const acc_t<T>* __restrict__ residual,  // [M]: each row's c; RMSNorm: nullptr
                                     acc_t<T>* __restrict__ partials,  // [gridDim.y, 2, n]
                                     int64_t rows, int n, int64_t rows_per_slice) {
  using A = acc_t<T>;
  LN_EXT_SHARED(A, part_dw, [kColRowLanes][kColTile]);
  LN_EXT_SHARED(A, part_db, [kColRowLanes][kColTile]);
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t row_end = row_begin + rows_per_slice < rows ? row_begin + rows_per_slice : rows;
  A dw = 0, db = 0;
  if (col < n) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kColRowLanes) {
      const int64_t off = r * n + col;
      const A d = to_acc(dy[off]);
      const A shift = mean != nullptr ? mean[r] : A(0), c = residual != nullptr ? residual[r] : A(0);
      dw += d * (((to_acc(x[off]) - shift) - c) * rstd[r]);
      db += d;
    }
  }
  part_dw[threadIdx.y][threadIdx.x] = dw;
  part_db[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    A total_dw = 0, total_db = 0;
    for (int lane = 0; lane < kColRowLanes; ++lane) {
      total_dw += part_dw[lane][threadIdx.x];
      total_db += part_db[lane][threadIdx.x];
    }
    A* out = partials + static_cast<int64_t>(blockIdx.y) * 2 * n;
    out[col] = total_dw;
    out[n + col] = total_db;
  }
}

// dweight[j] = sum_b partials[b, 0, j], dbias[j] = sum_b partials[b, 1, j], in a
// fixed order: row lane y adds blocks y, y + kColRowLanes, ..., then lanes in order.
template <typename A, typename O>
__global__ void __launch_bounds__(kColTile* kColRowLanes)
    layer_norm_bwd_param_reduce_kernel(const A* __restrict__ partials,  // [blocks, 2, n]
                                       int blocks, int n,
                                       O* __restrict__ dweight,  // [n] or nullptr
                                       O* __restrict__ dbias) {  // [n] or nullptr
  LN_EXT_SHARED(A, part, [2][kColRowLanes][kColTile]);
  const int col = blockIdx.x * kColTile + threadIdx.x;
  A dw = 0, db = 0;
  if (col < n) {
    for (int b = threadIdx.y; b < blocks; b += kColRowLanes) {
      const A* block_partial = partials + static_cast<int64_t>(b) * 2 * n;
      // Only the sums asked for: RMSNorm's kernels write no dbias partials (initcheck).
      if (dweight != nullptr) dw += block_partial[col];
      if (dbias != nullptr) db += block_partial[n + col];
    }
  }
  part[0][threadIdx.y][threadIdx.x] = dw;
  part[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    A total_dw = 0, total_db = 0;
    for (int lane = 0; lane < kColRowLanes; ++lane) {
      total_dw += part[0][lane][threadIdx.x];
      total_db += part[1][lane][threadIdx.x];
    }
    if (dweight != nullptr) dweight[col] = from_acc<O>(total_dw);
    if (dbias != nullptr) dbias[col] = from_acc<O>(total_db);
  }
}

}  // namespace kernels
}  // namespace ln_ext
