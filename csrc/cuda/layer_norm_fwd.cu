// CUDA launcher of layer_norm_fwd: dtype dispatch, kernel shape by N, stream,
// and the TORCH_LIBRARY_IMPL(ln_ext, CUDA) registration. Kernels: kernels/layer_norm_fwd.cuh.
//
// dtype combinations (x, weight/bias, y), accumulation float (double for double):
//   float:    (float,  float,  float)
//   double:   (double, double, double)
//   half:     (half, half|float, half|float)          4 combinations
//   bfloat16: (bf16, bf16|float, bf16|float)          4 combinations
// Absent weight/bias are nullptr at run time (no extra instantiations).
//
// Kernel shape by C = max_chunks_per_row(N, V), V = 16 / sizeof(x element):
//   C <= 32:         rows kernel, K=1, 1..32 threads per row, 256-thread blocks
//   C <= 4 * 512:    rows kernel, K=4, 16..512 threads per row (a block per row above 32)
//   larger:          cluster kernel (sm_90+) when the row does not fit in one block's
//                    shared memory or the rows are too few to fill the card: 2..16
//                    1024-thread blocks per row, each caching its slice; otherwise
//                    (or without clusters) the long kernel, a 1024-thread block per
//                    row, row cached in shared memory (as much as fits; the rest re-read)
#include "../layer_norm.h"
#include "../kernels/layer_norm_fwd.cuh"
#include "launch_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ln_ext {
namespace {

using namespace cuda_launch;

constexpr int kFwdBigK = 4;
constexpr int kFwdMaxGroup = 512;  // K=4 rows at 1024 threads spill (64-register cap)

template <typename T, typename P, typename Y>
void launch_fwd(const LayerNormFwdArgs& a) {
  using A = kernels::acc_t<T>;
  constexpr int V = kernels::kVecElems<T>;
  TORCH_CHECK(a.cols <= kMaxCols, "ln_ext.layer_norm (CUDA): normalized size ", a.cols,
              " is larger than the supported ", kMaxCols);
  kernels::FwdParams<T, P, Y> p;
  p.x = const_ptr<T>(a.x);
  p.weight = const_ptr<P>(a.weight);
  p.bias = const_ptr<P>(a.bias);
  p.y = mut_ptr<Y>(a.y);
  p.mean = mut_ptr<A>(a.mean);
  p.rstd = mut_ptr<A>(a.rstd);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.eps = static_cast<A>(a.eps);
  p.vec_ok = aligned16(p.x) && aligned16(p.y);
  p.params_vec_ok = aligned16(p.weight) && aligned16(p.bias);
  p.lean_cluster_sum = lean_cluster_sum();

  const int chunks = kernels::max_chunks_per_row(p.cols, V);
  const RowsConfig cfg = choose_rows_config(chunks, kFwdBigK, kFwdMaxGroup);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (cfg.k != 0) {
    auto kernel = cfg.k == 1 ? kernels::layer_norm_fwd_rows_kernel<T, P, Y, 1>
                             : kernels::layer_norm_fwd_rows_kernel<T, P, Y, kFwdBigK>;
    const int grid = persistent_grid(kernel, ceil_div(a.rows, cfg.rows_per_block()), cfg.block);
    log_launch(cfg.k == 1 ? "fwd rows K=1" : "fwd rows K=4", a.rows, a.cols, grid, cfg.block, 1, 0);
    kernel<<<grid, cfg.block, 0, stream>>>(p, cfg.group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Rows longer than one block's shared memory, or too few rows for the card: a
  // cluster of blocks per row (sm_90+), each caching its slice of the row.
  auto cluster_kernel = kernels::layer_norm_fwd_cluster_kernel<T, P, Y>;
  const ClusterPlan plan = plan_cluster(cluster_kernel, chunks, a.rows, [](int slice_chunks) {
    return kernels::cluster_header_words<A>() * sizeof(uint4) +
           static_cast<size_t>(slice_chunks) * V * sizeof(T);
  });
  if (plan.blocks != 0) {
    log_launch("fwd cluster", a.rows, a.cols, plan.grid, kLongBlock, plan.blocks, plan.smem);
    launch_cluster(cluster_kernel, plan, stream, p, plan.slice_chunks);
    return;
  }
  const int cached = cached_chunks(chunks, V * sizeof(T), 0);
  const size_t smem = static_cast<size_t>(cached) * V * sizeof(T);
  auto kernel = kernels::layer_norm_fwd_long_kernel<T, P, Y>;
  const int grid = persistent_grid(kernel, a.rows, kLongBlock, smem);
  log_launch("fwd long", a.rows, a.cols, grid, kLongBlock, 1, smem);
  kernel<<<grid, kLongBlock, smem, stream>>>(p, cached);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// half / bfloat16 x: weight/bias and y each either x's type or float32.
template <typename T>
void launch_fwd_reduced(const LayerNormFwdArgs& a, bool params_float, bool y_float) {
  if (params_float) {
    y_float ? launch_fwd<T, float, float>(a) : launch_fwd<T, float, T>(a);
  } else {
    y_float ? launch_fwd<T, T, float>(a) : launch_fwd<T, T, T>(a);
  }
}

}  // namespace

void layer_norm_fwd_cuda_kernel(const LayerNormFwdArgs& a) {
  const at::ScalarType x_t = a.x.scalar_type();
  // weight and bias share a dtype when both exist (checked by layer_norm_fwd_impl).
  const at::ScalarType params_t = a.weight.defined() ? a.weight.scalar_type()
                                  : a.bias.defined() ? a.bias.scalar_type()
                                                     : x_t;
  const bool params_float = params_t == at::kFloat;
  const bool y_float = a.y.scalar_type() == at::kFloat;
  switch (x_t) {
    case at::kFloat:
      return launch_fwd<float, float, float>(a);
    case at::kDouble:
      return launch_fwd<double, double, double>(a);
    case at::kHalf:
      return launch_fwd_reduced<__half>(a, params_float, y_float);
    case at::kBFloat16:
      return launch_fwd_reduced<__nv_bfloat16>(a, params_float, y_float);
    default:
      TORCH_CHECK(false, "ln_ext.layer_norm (CUDA): unsupported input dtype ", x_t);
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype) {
  // Guard on x's device; when x is not a CUDA tensor the device checks of
  // layer_norm_fwd_impl report the mismatch by name.
  const c10::cuda::OptionalCUDAGuard guard(
      x.is_cuda() ? std::optional<c10::Device>(x.device()) : std::nullopt);
  return layer_norm_fwd_impl(x, normalized_shape, weight, bias, eps, out_dtype,
                             layer_norm_fwd_cuda_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, CUDA, m) { m.impl("layer_norm_fwd", &layer_norm_fwd_cuda); }

}  // namespace ln_ext
