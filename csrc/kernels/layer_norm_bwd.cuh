// LayerNorm backward kernels. Device code only; knows nothing of torch.
//
// With xhat = (x - mean) * rstd and g = dy * weight (weight absent: g = dy):
//   dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))       per row
//   dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
// accumulating in acc_t<T>. No floating-point atomics: dweight/dbias are summed
// as per-block partials [blocks, 2, N] (dweight sums, then dbias sums), which a
// second kernel adds in block order, so every bit is reproducible run to run.
//
// Families (x and dy always through the chunk grid of vec.cuh):
//  * rows kernel: x and dy of a row live in registers (K chunks per thread,
//    `group` threads per row as in the forward rows kernel); one read of x and
//    dy, writes dx. When `partials` is set each thread also sums dy*xhat and dy
//    over all its rows in registers, for columns that stay the same from row to
//    row: when every row starts on a chunk (N % V == 0) those of its own chunks;
//    otherwise (the row's chunks start `head` columns early, head varying by
//    row) the group first writes the row's dy*xhat and dy in chunk order to a
//    staging row in shared memory and each thread then adds the columns
//    lane + m * group (bank-conflict-free reads). The block adds its row groups
//    in group order and writes one partial row. Everything is read exactly once.
//  * long kernel: any N, one row per block. x and dy are cached raw in shared
//    memory, as much of the row as fits (read once), the rest re-read (L2).
//    When `partials` is set, the block's dweight/dbias sums [2, N] live in
//    shared memory ahead of the cache, column j owned by thread j % blockDim.x
//    (x and dy read from the cache or L2 once more).
//  * cluster kernel (sm_90): one row per thread-block cluster (cluster.cuh).
//    Block `rank` caches x and dy of its slice of the row's chunks (and the chunk
//    after it) in shared memory, adds the slice's share of the row's two sums
//    into cluster-wide sums (distributed shared memory), and writes its dx. When
//    `partials` is set it also owns the dweight/dbias sums of the columns
//    [rank * slice_chunks * V, (rank + 1) * slice_chunks * V) in shared memory:
//    rows too long for one block's sums (bf16 N >= 32768) keep the 3·M·N traffic.
//  * param_cols kernel: dweight/dbias of rows too long for those sums to fit in
//    shared memory: column-parallel sums over a slice of rows per block;
//    re-reads x and dy (coalesced scalar loads).
//  * param_reduce kernel: adds the [blocks, 2, N] partials in block order and
//    converts to the parameter dtype.
// Assumes: N >= 1, N + 2*V fits in int, same launch shape rules as the forward.
// Measured: not yet on a GPU (see benchmarks/NOTES.md for ptxas/SASS facts).
#pragma once

#include "cluster.cuh"
#include "reduce.cuh"
#include "vec.cuh"

namespace ln_ext {
namespace kernels {

// Bytes of a row each thread loads at once while filling a row cache (cache_chunks).
constexpr int kBwdCacheBatchBytes = 32;

template <typename T, typename DY, typename P>
struct BwdParams {
  const DY* dy;           // [M, N]
  const T* x;             // [M, N]
  const acc_t<T>* mean;   // [M]
  const acc_t<T>* rstd;   // [M]
  const P* weight;        // [N] or nullptr (acts as 1)
  T* dx;                  // [M, N] or nullptr (not requested)
  acc_t<T>* partials;     // [gridDim.x, 2, N] or nullptr (dweight/dbias not fused)
  int64_t rows;
  int cols;
  bool vec_ok;         // x, dy and dx 16-byte aligned
  bool weight_vec_ok;  // weight (if present) 16-byte aligned
};

template <typename T, typename DY, typename P, int K>
__global__ void __launch_bounds__(512)
    layer_norm_bwd_rows_kernel(const BwdParams<T, DY, P> p, const int group) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  __shared__ A scratch[32];
  const int n = p.cols;
  const int lane = threadIdx.x & (group - 1);
  const int rows_per_block = blockDim.x / group;
  const bool fused_params = p.partials != nullptr;
  // Rows not all starting on a chunk: dweight/dbias go through the staging row.
  const bool staged = fused_params && n % V != 0;
  // Dynamic shared memory: staged, per row group [2][stage_len] (dy*xhat, dy in
  // chunk order); after the row loop, [rows_per_block, N] to add the groups.
  extern __shared__ uint4 dynamic_smem[];
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
    const A mean = valid ? p.mean[row] : A(0);
    const A rstd = valid ? p.rstd[row] : A(0);
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;

    A xhat[K][V], g[K][V];  // zero outside the row
    A sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int s = k * group + lane;
      const int col0 = s * V - rc.head;
      A w[V];
      if (s < rc.count) {
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        load_chunk(x_row + s * V, full, col0, n, A(0), xhat[k]);
        load_chunk(dy_row + s * V, full, col0, n, A(0), g[k]);
        load_param_chunk(p.weight, full && p.weight_vec_ok, col0, n, A(1), w);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          xhat[k][i] = in_row(col0 + i, n) ? (xhat[k][i] - mean) * rstd : A(0);
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) xhat[k][i] = g[k][i] = w[i] = 0;
      }
      if (staged && s < rc.count) {  // zeros outside the row are never read back
        alignas(16) A dw[V], db[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          dw[i] = g[k][i] * xhat[k][i];
          db[i] = g[k][i];
        }
        store_words<V>(stage_dw + s * V, dw);
        store_words<V>(stage_db + s * V, db);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A dy = g[k][i];
        if (fused_params && !staged) {  // chunk-aligned rows: column s*V + i
          acc_dw[k][i] += dy * xhat[k][i];
          acc_db[k][i] += dy;
        }
        g[k][i] = dy * w[i];
        sum_g += g[k][i];
        sum_gx += g[k][i] * xhat[k][i];
      }
    }
    if (staged) {
      row_group_sync(group);  // the group's staging row is complete
      if (valid) {
        for_each_column([&](int k, int i, int col) {
          acc_dw[k][i] += stage_dw[rc.head + col];  // column col of the row
          acc_db[k][i] += stage_db[rc.head + col];
        });
      }
      row_group_sync(group);  // read before the next row overwrites it
    }
    const A mean_g = row_group_sum(sum_g, group, scratch) / A(n);
    const A mean_gx = row_group_sum(sum_gx, group, scratch) / A(n);

    if (p.dx != nullptr) {
      T* dx_row = p.dx + rc.first * V;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int s = k * group + lane;
        const int col0 = s * V - rc.head;
        if (s < rc.count) {
          A out[V];
#pragma unroll
          for (int i = 0; i < V; ++i) out[i] = rstd * (g[k][i] - mean_g - xhat[k][i] * mean_gx);
          store_chunk(dx_row + s * V, chunk_is_full<V>(p.vec_ok, col0, n), col0, n, out);
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
    for_each_column([&](int k, int i, int col) {
      block_partial[col] = acc_dw[k][i];
      block_partial[n + col] = acc_db[k][i];
    });
    return;
  }
  A* groups = reinterpret_cast<A*>(dynamic_smem);  // [rows_per_block, n]
  A* group_row = groups + (threadIdx.x / group) * n;
  __syncthreads();  // staged: every group is done with its staging row
#pragma unroll
  for (int which = 0; which < 2; ++which) {
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

template <typename T, typename DY, typename P>
__global__ void __launch_bounds__(1024)
    layer_norm_bwd_long_kernel(const BwdParams<T, DY, P> p, const int cached_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  __shared__ A scratch[32];
  // Dynamic shared memory: partials set: [2, long_param_cols(n)] A (dweight, dbias
  // sums of this block's rows); then the row's first cached_chunks chunks of x and
  // of dy: [cached_chunks * V] T, [cached_chunks * V] DY.
  extern __shared__ uint4 dynamic_smem[];
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
    const A mean = p.mean[row];
    const A rstd = p.rstd[row];
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;
    // As in the forward long kernel, a thread only touches its own chunks.
    const int cache_end = imin(rc.count, cached_chunks);
    cache_chunks<V, kBwdCacheBatchBytes>(x_row, x_cache, 0, cache_end, rc.head, n, p.vec_ok);
    cache_chunks<V, kBwdCacheBatchBytes>(dy_row, dy_cache, 0, cache_end, rc.head, n, p.vec_ok);
    // Element e of the row's chunks (chunk e / V): in the cache when it holds it,
    // else in memory (read again).
    auto x_at = [&](int e) { return (e < cached_chunks * V ? x_cache : x_row) + e; };
    auto dy_at = [&](int e) { return (e < cached_chunks * V ? dy_cache : dy_row) + e; };

    if (fused_params) {  // column j of the row is element head + j of its chunks
      // Columns cut across the chunks that other threads cached. (The cache is
      // refilled only after the dx pass's block sums: every thread is past this.)
      if (cached_chunks > 0) __syncthreads();
      for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const A dy = to_acc(*dy_at(rc.head + j));
        sum_dw[j] += dy * ((to_acc(*x_at(rc.head + j)) - mean) * rstd);
        sum_db[j] += dy;
      }
    }
    if (p.dx == nullptr) continue;

    // One chunk's xhat and g, zero outside the row.
    auto load_xhat_g = [&](int s, int col0, bool full, A (&xhat)[V], A (&g)[V]) {
      A w[V];
      load_chunk(x_at(s * V), full, col0, n, A(0), xhat);
      load_chunk(dy_at(s * V), full, col0, n, A(0), g);
      load_param_chunk(p.weight, full && p.weight_vec_ok, col0, n, A(1), w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xhat[i] = in_row(col0 + i, n) ? (xhat[i] - mean) * rstd : A(0);
        g[i] *= w[i];
      }
    };

    A sum_g = 0, sum_gx = 0;
    for (int s = threadIdx.x; s < rc.count; s += blockDim.x) {
      const int col0 = s * V - rc.head;
      A xhat[V], g[V];
      load_xhat_g(s, col0, chunk_is_full<V>(p.vec_ok, col0, n), xhat, g);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sum_g += g[i];
        sum_gx += g[i] * xhat[i];
      }
    }
    const A mean_g = block_sum(sum_g, scratch) / A(n);
    const A mean_gx = block_sum(sum_gx, scratch) / A(n);

    T* dx_row = p.dx + rc.first * V;
    for (int s = threadIdx.x; s < rc.count; s += blockDim.x) {
      const int col0 = s * V - rc.head;
      const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
      A xhat[V], g[V], out[V];
      load_xhat_g(s, col0, full, xhat, g);
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
      store_chunk(dx_row + s * V, full, col0, n, out);
    }
  }

  if (fused_params) {
    A* block_partial = p.partials + static_cast<int64_t>(blockIdx.x) * 2 * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      block_partial[j] = sum_dw[j];
      block_partial[n + j] = sum_db[j];
    }
  }
}

template <typename T, typename DY, typename P>
__global__ void __launch_bounds__(1024)
    layer_norm_bwd_cluster_kernel(const BwdParams<T, DY, P> p, const int slice_chunks) {
  using A = acc_t<T>;
  constexpr int V = kVecElems<T>;
  // Dynamic shared memory only (see the forward cluster kernel): the header
  // (cluster.cuh); partials set: dweight/dbias sums of this block's columns
  // [2][long_param_cols(slice_chunks * V)] A; then x and dy of this block's chunks
  // and the one after them, [(slice_chunks + 1) * V] T and DY.
  extern __shared__ uint4 dynamic_smem[];
  ClusterSum<A, 2> cluster_sum(dynamic_smem);
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
    const A mean = p.mean[row];
    const A rstd = p.rstd[row];
    const int begin = imin(rank * slice_chunks, rc.count);
    const int end = imin(begin + slice_chunks, rc.count);
    const T* x_row = p.x + rc.first * V;
    const DY* dy_row = p.dy + rc.first * V;
    // The previous row's column pass read chunks that other threads cache.
    __syncthreads();
    // This block's columns end up to `head` elements into chunk `end`: cache it too.
    const int cache_end = imin(end + 1, rc.count);
    cache_chunks<V, kBwdCacheBatchBytes>(x_row, x_cache, begin, cache_end, rc.head, n, p.vec_ok);
    cache_chunks<V, kBwdCacheBatchBytes>(dy_row, dy_cache, begin, cache_end, rc.head, n, p.vec_ok);

    if (fused_params) {  // column j is element head + j of the row's chunks
      __syncthreads();   // columns cut across the chunks that other threads cached
      for (int j = col_begin + threadIdx.x; j < col_end; j += blockDim.x) {
        const int e = rc.head + j - begin * V;
        const A dy = to_acc(dy_cache[e]);
        sum_dw[j - col_begin] += dy * ((to_acc(x_cache[e]) - mean) * rstd);
        sum_db[j - col_begin] += dy;
      }
    }
    if (p.dx == nullptr) continue;

    // This thread's chunks s (the ones it cached), as xhat and g = dy * weight, zero
    // outside the row.
    auto for_my_chunks = [&](auto&& f) {
      for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
        const int col0 = s * V - rc.head;
        const bool full = chunk_is_full<V>(p.vec_ok, col0, n);
        A xhat[V], g[V], w[V];
        load_chunk(x_cache + (s - begin) * V, full, col0, n, A(0), xhat);
        load_chunk(dy_cache + (s - begin) * V, full, col0, n, A(0), g);
        load_param_chunk(p.weight, full && p.weight_vec_ok, col0, n, A(1), w);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          xhat[i] = in_row(col0 + i, n) ? (xhat[i] - mean) * rstd : A(0);
          g[i] *= w[i];
        }
        f(s, col0, full, xhat, g);
      }
    };

    A sums[2] = {0, 0};  // sum of g, sum of g * xhat
    for_my_chunks([&](int, int, bool, const A(&xhat)[V], const A(&g)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sums[0] += g[i];
        sums[1] += g[i] * xhat[i];
      }
    });
    cluster_sum(sums);
    const A mean_g = sums[0] / A(n);
    const A mean_gx = sums[1] / A(n);

    T* dx_row = p.dx + rc.first * V;
    for_my_chunks([&](int s, int col0, bool full, const A(&xhat)[V], const A(&g)[V]) {
      A out[V];
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
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
                                     const acc_t<T>* __restrict__ mean,
                                     const acc_t<T>* __restrict__ rstd,
                                     acc_t<T>* __restrict__ partials,  // [gridDim.y, 2, n]
                                     int64_t rows, int n, int64_t rows_per_slice) {
  using A = acc_t<T>;
  __shared__ A part_dw[kColRowLanes][kColTile];
  __shared__ A part_db[kColRowLanes][kColTile];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t row_end = row_begin + rows_per_slice < rows ? row_begin + rows_per_slice : rows;
  A dw = 0, db = 0;
  if (col < n) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kColRowLanes) {
      const int64_t off = r * n + col;
      const A d = to_acc(dy[off]);
      dw += d * ((to_acc(x[off]) - mean[r]) * rstd[r]);
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
  __shared__ A part[2][kColRowLanes][kColTile];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  A dw = 0, db = 0;
  if (col < n) {
    for (int b = threadIdx.y; b < blocks; b += kColRowLanes) {
      const A* block_partial = partials + static_cast<int64_t>(b) * 2 * n;
      dw += block_partial[col];
      db += block_partial[n + col];
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
