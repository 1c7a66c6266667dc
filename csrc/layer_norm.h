// Shared by the CPU and CUDA launchers of the LayerNorm ops: argument checks,
// output allocation and the kernel entry points each device provides.
//
// Shapes: x is viewed as [M, N] with N = prod(normalized_shape) and M the
// product of the leading dims; mean/rstd: [M] (stored with x.shape[:-k]).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ln_ext {

// Contiguous operands of one forward call; weight/bias may be undefined.
struct LayerNormFwdArgs {
  at::Tensor x, weight, bias;  // x: [M, N], weight/bias: [N]
  at::Tensor y, mean, rstd;    // y: [M, N] (out dtype), mean/rstd: [M]
  int64_t rows, cols;
  double eps;
};

// Contiguous operands of one backward call; an output not asked for is undefined.
struct LayerNormBwdArgs {
  at::Tensor dy, x, mean, rstd, weight;  // dy, x: [M, N]
  at::Tensor dx, dweight, dbias;         // dx: [M, N], dweight/dbias: [N]
  int64_t rows, cols;
};

using LayerNormFwdKernel = void (*)(const LayerNormFwdArgs&);
using LayerNormBwdKernel = void (*)(const LayerNormBwdArgs&);

// Device-independent op bodies: check the arguments, make them contiguous,
// allocate the outputs and hand the rows to `kernel` (skipped when empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_impl(
    const at::Tensor& x, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype, LayerNormFwdKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask,
    LayerNormBwdKernel kernel);

// The ops through the dispatcher (autograd, autocast, device and fake kernels
// included), for C++ callers: the autograd backward and the Python fast path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm_fwd(
    const at::Tensor& x, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask);

// Kernel entry points.
void layer_norm_fwd_cpu_kernel(const LayerNormFwdArgs& args);
void layer_norm_bwd_cpu_kernel(const LayerNormBwdArgs& args);
#ifdef LN_EXT_WITH_CUDA
void layer_norm_fwd_cuda_kernel(const LayerNormFwdArgs& args);
void layer_norm_bwd_cuda_kernel(const LayerNormBwdArgs& args);
#endif

}  // namespace ln_ext
