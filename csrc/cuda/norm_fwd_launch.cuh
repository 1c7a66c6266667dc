// CUDA launch of the norm family's forward (LayerNorm, RMSNorm; optionally of h = x +
// residual): dtype dispatch for one x dtype and kernel shape by N. Each x dtype's
// instantiations are compiled in their own layer_norm_fwd_<dtype>.cu (in parallel);
// layer_norm_fwd.cu picks one. Kernels: kernels/layer_norm_fwd.cuh.
//
// dtype combinations (x, weight/bias, y, residual/h), accumulation float (double for double),
// each for LayerNorm and RMSNorm (kCentered):
//   float:    (float,  float,  float, float)
//   double:   (double, double, double, double)
//   half:     (half, half|float, half|float, half|float)          8 combinations
//   bfloat16: (bf16, bf16|float, bf16|float, bf16|float)          8 combinations
// Absent weight/bias/residual are nullptr at run time (no extra instantiations).
//
// Kernel shape by C = max_chunks_per_row(N, V), V = 16 / sizeof(x element):
//   C <= 32:         rows kernel, K=1, 1..32 threads per row, 256-thread blocks
//   C <= 4 * 512:    rows kernel, K=4, 16..512 threads per row (a block per row above 32)
//   larger:          cluster kernel (sm_90+) when the row does not fit in one block's
//                    shared memory or the rows are too few to fill the card: 2..16
//                    1024-thread blocks per row, each caching its slice; otherwise
//                    (or without clusters) the long kernel, a 1024-thread block per
//                    row, row cached in shared memory (as much as fits; the rest re-read)
#pragma once

#include "../layer_norm.h"
#include "../kernels/layer_norm_fwd.cuh"
#include "launch_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

namespace ln_ext {
namespace cuda_launch {

constexpr int kFwdBigK = 4;
constexpr int kFwdMaxGroup = 512;  // K=4 rows at 1024 threads spill (64-register cap)

template <typename T, typename P, typename Y, typename R, bool kCentered>
void launch_fwd(const NormFwdArgs& a) {
  using A = kernels::acc_t<T>;
  constexpr int V = kernels::kVecElems<T>;
  TORCH_CHECK(a.cols <= kMaxCols, "ln_ext (CUDA): normalized size ", a.cols,
              " is larger than the supported ", kMaxCols);
  kernels::FwdParams<T, P, Y, R> p;
  p.x = const_ptr<T>(a.x);
  p.residual = const_ptr<R>(a.residual);
  p.h = mut_ptr<R>(a.h);
  p.weight = const_ptr<P>(a.weight);
  p.bias = const_ptr<P>(a.bias);
  p.y = mut_ptr<Y>(a.y);
  p.mean = mut_ptr<A>(a.mean);
  p.rstd = mut_ptr<A>(a.rstd);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.eps = static_cast<A>(a.eps);
  p.weight_offset = static_cast<A>(a.weight_offset);
  p.vec_ok = aligned16(p.x) && aligned16(p.y) && aligned16(p.residual) && aligned16(p.h);
  p.params_vec_ok = aligned16(p.weight) && aligned16(p.bias);
  p.lean_cluster_sum = lean_cluster_sum();

  const int chunks = kernels::max_chunks_per_row(p.cols, V);
  const RowsConfig cfg = choose_rows_config(chunks, kFwdBigK, kFwdMaxGroup);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (cfg.k != 0) {
    auto kernel = cfg.k == 1 ? kernels::layer_norm_fwd_rows_kernel<T, P, Y, R, kCentered, 1>
                             : kernels::layer_norm_fwd_rows_kernel<T, P, Y, R, kCentered, kFwdBigK>;
    const int grid = persistent_grid(kernel, ceil_div(a.rows, cfg.rows_per_block()), cfg.block);
    log_launch(cfg.k == 1 ? "fwd rows K=1" : "fwd rows K=4", a.rows, a.cols, grid, cfg.block, 1, 0);
    kernel<<<grid, cfg.block, 0, stream>>>(p, cfg.group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Rows longer than one block's shared memory, or too few rows for the card: a
  // cluster of blocks per row (sm_90+), each caching its slice of the row.
  auto cluster_kernel = kernels::layer_norm_fwd_cluster_kernel<T, P, Y, R, kCentered>;
  const ClusterPlan plan = plan_cluster(cluster_kernel, chunks, a.rows, [](int slice_chunks) {
    return kernels::cluster_header_words<A>() * sizeof(uint4) +
           static_cast<size_t>(slice_chunks) * V * sizeof(R);  // the cache holds the input: x or h
  });
  if (plan.blocks != 0) {
    log_launch("fwd cluster", a.rows, a.cols, plan.grid, kLongBlock, plan.blocks, plan.smem);
    launch_cluster(cluster_kernel, plan, stream, p, plan.slice_chunks);
    return;
  }
  const int cached = cached_chunks(chunks, V * sizeof(R), 0);
  const size_t smem = static_cast<size_t>(cached) * V * sizeof(R);
  auto kernel = kernels::layer_norm_fwd_long_kernel<T, P, Y, R, kCentered>;
  const int grid = persistent_grid(kernel, a.rows, kLongBlock, smem);
  log_launch("fwd long", a.rows, a.cols, grid, kLongBlock, 1, smem);
  kernel<<<grid, kLongBlock, smem, stream>>>(p, cached);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Every forward of an x of type T: LayerNorm or RMSNorm; weight/bias, y and h each
// x's type or (for a 16-bit x) float32.
template <typename T>
void launch_fwd_for_input(const NormFwdArgs& a) {
  const at::ScalarType params_t = a.weight.defined() ? a.weight.scalar_type()
                                  : a.bias.defined()  ? a.bias.scalar_type()
                                                      : a.x.scalar_type();
  const bool params_float = params_t == at::kFloat && !std::is_same_v<T, float>;
  const bool y_float = a.y.scalar_type() == at::kFloat && !std::is_same_v<T, float>;
  const bool h_float = a.h.defined() && a.h.scalar_type() == at::kFloat && !std::is_same_v<T, float>;
  auto with_centered = [&](auto p_tag, auto y_tag, auto r_tag) {
    using P = decltype(p_tag);
    using Y = decltype(y_tag);
    using R = decltype(r_tag);
    a.centered ? launch_fwd<T, P, Y, R, true>(a) : launch_fwd<T, P, Y, R, false>(a);
  };
  auto with_h = [&](auto p_tag, auto y_tag) { h_float ? with_centered(p_tag, y_tag, float{}) : with_centered(p_tag, y_tag, T{}); };
  auto with_y = [&](auto p_tag) { y_float ? with_h(p_tag, float{}) : with_h(p_tag, T{}); };
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    with_centered(T{}, T{}, T{});
  } else {
    params_float ? with_y(float{}) : with_y(T{});
  }
}

// Compiled in layer_norm_fwd_<dtype>.cu.
extern template void launch_fwd_for_input<float>(const NormFwdArgs&);
extern template void launch_fwd_for_input<double>(const NormFwdArgs&);
extern template void launch_fwd_for_input<__half>(const NormFwdArgs&);
extern template void launch_fwd_for_input<__nv_bfloat16>(const NormFwdArgs&);

}  // namespace cuda_launch
}  // namespace ln_ext
