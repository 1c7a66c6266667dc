// CUDA launch of the norm family's backward (LayerNorm, RMSNorm; with a gradient of h for
// add + norm): dtype dispatch for one dtype of the norm's input and kernel shape by N. Each
// dtype's instantiations are compiled in their own layer_norm_bwd_<dtype>.cu (in
// parallel); layer_norm_bwd.cu picks one. Kernels: kernels/layer_norm_bwd.cuh.
//
// dtype combinations (x, dy, weight), accumulation float (double for double), each for
// LayerNorm and RMSNorm (kCentered):
//   float:    (float,  float,  float)
//   double:   (double, double, double)
//   half:     (half, half|float, half|float)          4 combinations
//   bfloat16: (bf16, bf16|float, bf16|float)          4 combinations
// dx has x's dtype; dweight/dbias the parameter dtype (x's or float32).
// An absent weight is nullptr at run time; outputs not requested are skipped.
//
// Plan by C = max_chunks_per_row(N, V), V = 16 / sizeof(x element):
//   C <= 32:        rows kernel, K=1, 1..32 threads per row, 256-thread blocks
//   C <= 2 * 512:   rows kernel, K=2, 32..512 threads per row (a block per row above 32)
//   larger:         cluster kernel (sm_90+) when one block cannot hold the row (with
//                   the dweight/dbias sums) or the rows are too few for the card:
//                   2..16 1024-thread blocks per row; otherwise (or without
//                   clusters) the long kernel, a 1024-thread block per row
// dweight/dbias: fused into the rows kernel (any N and alignment; rows with
// N % V != 0 through a shared-memory staging row), into the long kernel while
// [2, N] acc sums fit in shared memory (N up to ~28K floats), and into the cluster
// kernel while each block's [2, N / blocks] sums fit next to its slice of x and dy
// (bf16 N up to 262144 with 16 blocks); otherwise the param_cols kernel. Either way
// per-block partials [blocks, 2, N] (acc dtype) are summed in block order by the
// param_reduce kernel: deterministic, no atomics.
#pragma once

#include "../layer_norm.h"
#include "../kernels/layer_norm_bwd.cuh"
#include "launch_common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

namespace ln_ext {
namespace cuda_launch {

constexpr int kBwdBigK = 2;
constexpr int kBwdMaxGroup = 512;

// Blocks of the param_cols kernel the launcher aims for, per multiprocessor.
constexpr int kColBlocksPerSm = 8;

// Per-block (or per-cluster) dweight/dbias sums [blocks, 2, N] in the acc dtype.
struct Partials {
  at::Tensor tensor;  // undefined: dweight/dbias not computed yet
  int blocks = 0;
};

inline Partials new_partials(const NormBwdArgs& a, int64_t blocks) {
  return {at::empty({blocks, 2, a.cols}, a.x.options().dtype(a.rstd.scalar_type())),
          static_cast<int>(blocks)};
}

// dweight/dbias [n] (each undefined when not asked for) from partials [blocks, 2, n], in
// block order; O is the parameter dtype. Shared with the channels-first backward.
template <typename A>
void launch_param_reduce(const Partials& partials, int64_t cols, const at::Tensor& dweight, const at::Tensor& dbias,
                         cudaStream_t stream) {
  const int n = static_cast<int>(cols);
  const at::Tensor& any_grad = dweight.defined() ? dweight : dbias;
  const dim3 block(kernels::kColTile, kernels::kColRowLanes);
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kernels::kColTile)));
  auto run = [&](auto out_tag) {
    using O = decltype(out_tag);
    kernels::layer_norm_bwd_param_reduce_kernel<A, O><<<grid, block, 0, stream>>>(
        const_ptr<A>(partials.tensor), partials.blocks, n, mut_ptr<O>(dweight), mut_ptr<O>(dbias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if constexpr (std::is_same_v<A, double>) {
    run(double{});
  } else {
    switch (any_grad.scalar_type()) {
      case at::kFloat:
        return run(float{});
      case at::kHalf:
        return run(__half{});
      case at::kBFloat16:
        return run(__nv_bfloat16{});
      default:
        TORCH_CHECK(false, "ln_ext (CUDA): unsupported parameter dtype ",
                    any_grad.scalar_type());
    }
  }
}

// Per-block partials of dweight/dbias by the column kernel (re-reads x and dy);
// `residual`: [M], each row's residual c from the long or cluster kernel.
template <typename T, typename DY>
Partials launch_param_cols(const NormBwdArgs& a, const at::Tensor& residual, cudaStream_t stream) {
  using A = kernels::acc_t<T>;
  const int n = static_cast<int>(a.cols);
  const int64_t col_tiles = ceil_div(n, kernels::kColTile);
  const int64_t target_blocks =
      static_cast<int64_t>(multiprocessor_count()) * kColBlocksPerSm;
  // Row slices: enough blocks to fill the card, at least 4 rows per row lane, grid.y <= 65535.
  const int64_t max_slices =
      std::min<int64_t>(65535, std::max<int64_t>(1, a.rows / (4 * kernels::kColRowLanes)));
  int64_t slices = std::clamp<int64_t>(ceil_div(target_blocks, col_tiles), 1, max_slices);
  const int64_t rows_per_slice = ceil_div(a.rows, slices);
  slices = ceil_div(a.rows, rows_per_slice);
  const Partials partials = new_partials(a, slices);
  const dim3 block(kernels::kColTile, kernels::kColRowLanes);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(slices));
  log_launch("bwd param_cols", a.rows, n, static_cast<int>(col_tiles * slices), block.x * block.y, 1, 0);
  kernels::layer_norm_bwd_param_cols_kernel<T, DY><<<grid, block, 0, stream>>>(
      const_ptr<DY>(a.dy), const_ptr<T>(a.x), const_ptr<A>(a.mean), const_ptr<A>(a.rstd),
      const_ptr<A>(residual), mut_ptr<A>(partials.tensor), a.rows, n, rows_per_slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Rows that fit in registers: the rows kernel, dweight/dbias always fused.
template <typename T, typename DY, typename P, bool kCentered>
Partials launch_bwd_rows(kernels::BwdParams<T, DY, P> p, const NormBwdArgs& a,
                         const RowsConfig& cfg, int chunks, bool want_dx, bool want_params,
                         cudaStream_t stream) {
  using A = kernels::acc_t<T>;
  constexpr int V = kernels::kVecElems<T>;
  if (!want_dx && !want_params) return {};
  auto kernel = cfg.k == 1 ? kernels::layer_norm_bwd_rows_kernel<T, DY, P, kCentered, 1>
                           : kernels::layer_norm_bwd_rows_kernel<T, DY, P, kCentered, kBwdBigK>;
  Partials partials;
  size_t smem = 0;
  if (want_params) {
    if (p.cols % V != 0) {
      // A staging row [2, chunks * V] acc per row group (<= 64 KiB per block), also
      // large enough for adding the groups.
      smem = static_cast<size_t>(cfg.rows_per_block()) * 2 * chunks * V * sizeof(A);
    } else if (cfg.rows_per_block() > 1) {
      // Row groups of a block meet in shared memory: [rows_per_block, N] acc (<= 16 KiB).
      smem = static_cast<size_t>(cfg.rows_per_block()) * a.cols * sizeof(A);
    }
  }
  // The grid is also the number of partial rows: as many blocks as are resident at once.
  const int grid = persistent_grid(kernel, ceil_div(a.rows, cfg.rows_per_block()), cfg.block, smem);
  if (want_params) {
    partials = new_partials(a, grid);
    p.partials = mut_ptr<A>(partials.tensor);
  }
  log_launch(cfg.k == 1 ? "bwd rows K=1" : "bwd rows K=2", a.rows, a.cols, grid, cfg.block, 1, smem);
  kernel<<<grid, cfg.block, smem, stream>>>(p, cfg.group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Long rows: the cluster kernel when one block cannot hold the row or the rows are
// too few for the card (sm_90+), else the long kernel. dweight/dbias fused when
// their sums fit in shared memory (they take precedence over the row cache: they
// save re-reading x and dy from HBM, the cache only from L2). Otherwise the kernel
// writes each row's residual to `residual` for the param_cols kernel (run without dx
// for that alone when dx is not asked for) and the returned partials are empty.
template <typename T, typename DY, typename P, bool kCentered>
Partials launch_bwd_long_rows(kernels::BwdParams<T, DY, P> p, const NormBwdArgs& a,
                              int chunks, bool want_dx, bool want_params, at::Tensor& residual,
                              cudaStream_t stream) {
  using A = kernels::acc_t<T>;
  constexpr int V = kernels::kVecElems<T>;
  const size_t chunk_bytes = V * (sizeof(T) + sizeof(DY));  // a chunk of x and one of dy
  Partials partials;
  if (!want_dx && !want_params) return partials;
  auto need_residual = [&] {  // RMSNorm takes no mean out: no residual of it either
    if (!kCentered) return;
    residual = at::empty({a.rows}, a.rstd.options());
    p.residual = mut_ptr<A>(residual);
  };

  auto cluster_kernel = kernels::layer_norm_bwd_cluster_kernel<T, DY, P, kCentered>;
  auto cluster_smem = [chunk_bytes](bool with_sums) {
    return [=](int slice_chunks) {
      const size_t sums = with_sums ? 2 * static_cast<size_t>(kernels::long_param_cols(slice_chunks * V)) * sizeof(A) : 0;
      return kernels::cluster_header_words<A>() * sizeof(uint4) + sums +
             static_cast<size_t>(slice_chunks + 1) * chunk_bytes;  // + 1: see the kernel
    };
  };
  ClusterPlan plan;
  bool fuse = want_params;
  if (fuse) plan = plan_cluster(cluster_kernel, chunks, a.rows, cluster_smem(true));
  if (plan.blocks == 0 && want_dx) {
    fuse = false;
    plan = plan_cluster(cluster_kernel, chunks, a.rows, cluster_smem(false));
  }
  if (plan.blocks != 0) {
    if (fuse) {
      partials = new_partials(a, plan.clusters());
      p.partials = mut_ptr<A>(partials.tensor);
    } else if (want_params) {
      need_residual();
    }
    log_launch(fuse ? "bwd cluster +dweight/dbias" : "bwd cluster", a.rows, a.cols, plan.grid,
               kLongBlock, plan.blocks, plan.smem);
    launch_cluster(cluster_kernel, plan, stream, p, plan.slice_chunks);
    return partials;
  }

  const size_t sums_bytes = 2 * static_cast<size_t>(kernels::long_param_cols(p.cols)) * sizeof(A);
  fuse = want_params && fits_in_shared_memory(sums_bytes);
  if (want_params && !fuse) need_residual();
  if (!want_dx && !fuse && p.residual == nullptr) return partials;  // RMSNorm: param_cols needs nothing first
  const size_t sums_used = fuse ? sums_bytes : 0;
  // The cache serves the dx passes and the dweight/dbias column pass; the residual alone
  // (for param_cols) reads x once.
  const int cached = (want_dx || fuse) ? cached_chunks(chunks, chunk_bytes, sums_used) : 0;
  const size_t smem = sums_used + static_cast<size_t>(cached) * chunk_bytes;
  auto kernel = kernels::layer_norm_bwd_long_kernel<T, DY, P, kCentered>;
  // Blocks beyond those resident at once would only add partial rows.
  const int grid = persistent_grid(kernel, a.rows, kLongBlock, smem);
  if (fuse) {
    partials = new_partials(a, grid);
    p.partials = mut_ptr<A>(partials.tensor);
  }
  log_launch(fuse ? "bwd long +dweight/dbias" : want_dx ? "bwd long" : "bwd long residual only", a.rows,
             a.cols, grid, kLongBlock, 1, smem);
  kernel<<<grid, kLongBlock, smem, stream>>>(p, cached);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

template <typename T, typename DY, typename P, bool kCentered>
void launch_bwd(const NormBwdArgs& a) {
  using A = kernels::acc_t<T>;
  constexpr int V = kernels::kVecElems<T>;
  TORCH_CHECK(a.cols <= kMaxCols, "ln_ext (CUDA): normalized size ", a.cols,
              " is larger than the supported ", kMaxCols);
  kernels::BwdParams<T, DY, P> p;
  // dh only adds to dx: without dx the rows kernel (which loads it with x and dy) skips it,
  // and an unused dh does not decide the alignment path.
  p.dh = a.dx.defined() ? const_ptr<T>(a.dh) : nullptr;
  p.dy = const_ptr<DY>(a.dy);
  p.x = const_ptr<T>(a.x);
  p.mean = const_ptr<A>(a.mean);
  p.rstd = const_ptr<A>(a.rstd);
  p.weight = const_ptr<P>(a.weight);
  p.weight_offset = static_cast<A>(a.weight_offset);
  p.dx = mut_ptr<T>(a.dx);
  p.partials = nullptr;
  p.residual = nullptr;
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.vec_ok = aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) && aligned16(p.dh);
  p.weight_vec_ok = aligned16(p.weight);
  p.lean_cluster_sum = lean_cluster_sum();

  const bool want_dx = a.dx.defined();
  const bool want_params = a.dweight.defined() || a.dbias.defined();
  const int chunks = kernels::max_chunks_per_row(p.cols, V);
  const RowsConfig cfg = choose_rows_config(chunks, kBwdBigK, kBwdMaxGroup);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Partials partials;  // dweight/dbias fused into the dx kernel when set
  at::Tensor residual;  // else each row's residual, for the column kernel
  if (cfg.k != 0) {
    partials = launch_bwd_rows<T, DY, P, kCentered>(p, a, cfg, chunks, want_dx, want_params, stream);
  } else {
    partials = launch_bwd_long_rows<T, DY, P, kCentered>(p, a, chunks, want_dx, want_params, residual, stream);
  }
  if (!want_params) return;
  if (!partials.tensor.defined()) partials = launch_param_cols<T, DY>(a, residual, stream);
  launch_param_reduce<A>(partials, a.cols, a.dweight, a.dbias, stream);
}

// Every backward of a norm input of type T: LayerNorm or RMSNorm; dy and weight each
// T or (for a 16-bit T) float32.
template <typename T>
void launch_bwd_for_input(const NormBwdArgs& a) {
  const bool reduced = !std::is_same_v<T, float> && !std::is_same_v<T, double>;
  const bool dy_float = reduced && a.dy.scalar_type() == at::kFloat;
  const bool weight_float = reduced && a.weight.defined() && a.weight.scalar_type() == at::kFloat;
  auto run = [&](auto dy_tag, auto w_tag) {
    using DY = decltype(dy_tag);
    using P = decltype(w_tag);
    a.centered ? launch_bwd<T, DY, P, true>(a) : launch_bwd<T, DY, P, false>(a);
  };
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    run(T{}, T{});
  } else if (dy_float) {
    weight_float ? run(float{}, float{}) : run(float{}, T{});
  } else {
    weight_float ? run(T{}, float{}) : run(T{}, T{});
  }
}

// Compiled in layer_norm_bwd_<dtype>.cu.
extern template void launch_bwd_for_input<float>(const NormBwdArgs&);
extern template void launch_bwd_for_input<double>(const NormBwdArgs&);
extern template void launch_bwd_for_input<__half>(const NormBwdArgs&);
extern template void launch_bwd_for_input<__nv_bfloat16>(const NormBwdArgs&);

}  // namespace cuda_launch
}  // namespace ln_ext
