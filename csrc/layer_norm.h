// Shared by the CPU and CUDA launchers of the norm family (LayerNorm, RMSNorm, and each
// fused with a residual add): argument checks, output allocation, the op functions a
// device registers, and the kernel entry points each device provides.
//
// Shapes: x is viewed as [M, N] with N = prod(normalized_shape) and M the product of
// the leading dims; mean/rstd: [M] (stored with x.shape[:-k]). An add + norm normalizes
// h = x + residual: [M, N] in the residual stream's dtype (x's, or float32 beside a
// 16-bit x), which it also returns.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace ln_ext {

// Contiguous operands of one forward call; undefined: absent.
struct NormFwdArgs {
  at::Tensor x, residual, weight, bias;  // x, residual: [M, N], weight/bias: [N]
  at::Tensor y, h, mean, rstd;           // y, h: [M, N], mean/rstd: [M]; h only with a residual
  int64_t rows = 0, cols = 0;
  double eps = 0;
  double weight_offset = 0;  // gain = weight_offset + weight (0 unless weight is given)
  bool centered = true;      // LayerNorm; false: RMSNorm (no mean, no bias)
};

// Contiguous operands of one backward call; an output not asked for is undefined.
struct NormBwdArgs {
  at::Tensor dy, x, mean, rstd, weight, dh;  // dy, x, dh: [M, N]; x is the norm's input
  at::Tensor dx, dweight, dbias;              // dx: [M, N] (+ dh), dweight/dbias: [N]
  int64_t rows = 0, cols = 0;
  double weight_offset = 0;  // as NormFwdArgs'
  bool centered = true;
};

// Argument checks shared by every op of the family (errors name `op` and the argument).
bool is_reduced_float(at::ScalarType t);
// x's dtype is a float type the kernels take.
void check_input_dtype(const char* op, const at::Tensor& x, const char* name);
// got is x_dtype or, beside a 16-bit x, float32.
bool dtype_matches(at::ScalarType got, at::ScalarType x_dtype);
void check_same_device(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name);
bool defined(const std::optional<at::Tensor>& t);
// weight and bias (each optional) of shape `shape`, x's device and a dtype the kernels take.
void check_params(const char* op, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x, at::IntArrayRef shape);
void check_weight_offset(const char* op, double weight_offset, const std::optional<at::Tensor>& weight);
// A backward's x and dy (a float dtype; dy of x's shape, its dtype or float32 beside 16-bit x)
// and rstd, all on x's device.
void check_backward_inputs(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd);
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t);
// A backward's outputs, allocated: dx (x's shape), dweight, dbias (their parameter's), each
// undefined when not asked for in output_mask or its parameter is absent.
std::array<at::Tensor, 3> new_grads(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask);
// What the op returns: each gradient, or a fresh empty [0] tensor where it is undefined
// (outputs of an op must not alias one another).
std::array<at::Tensor, 3> grads_as_outputs(const at::Tensor& x, const std::array<at::Tensor, 3>& grads);
// The typed dispatcher handle of an op of ours ("ln_ext::..."), for the call_* functions.
template <typename Fn>
auto op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Fn>();
}
// mean/rstd: float32, float64 for double x.
at::ScalarType stats_dtype(at::ScalarType x_dtype);

using NormFwdKernel = void (*)(const NormFwdArgs&);
using NormBwdKernel = void (*)(const NormBwdArgs&);

// Device-independent op bodies: check the arguments (errors name `op`, e.g.
// "ln_ext.rms_norm"), make them contiguous, allocate the outputs and hand the rows to
// `kernel` (skipped when empty).
NormFwdArgs norm_fwd_impl(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          std::optional<at::ScalarType> out_dtype, std::optional<at::ScalarType> residual_dtype,
                          double weight_offset, bool centered, NormFwdKernel kernel);
std::array<at::Tensor, 3> norm_bwd_impl(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                        const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                        std::array<bool, 3> output_mask, const std::optional<at::Tensor>& grad_h,
                                        double weight_offset, bool centered, NormBwdKernel kernel);

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using OptDtype = std::optional<at::ScalarType>;

// The op functions a device registers (register_norm_ops): the bodies above bound to
// that device's kernels. Schemas in csrc/registration.cpp.
template <NormFwdKernel K>
Tensor3 layer_norm_fwd_op(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                          const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset) {
  auto a = norm_fwd_impl("ln_ext.layer_norm", x, std::nullopt, normalized_shape, weight, bias, eps, out_dtype,
                         std::nullopt, weight_offset, true, K);
  return {a.y, a.mean, a.rstd};
}
template <NormFwdKernel K>
Tensor2 rms_norm_fwd_op(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, double eps,
                        OptDtype out_dtype, double weight_offset) {
  auto a = norm_fwd_impl("ln_ext.rms_norm", x, std::nullopt, normalized_shape, weight, std::nullopt, eps, out_dtype,
                         std::nullopt, weight_offset, false, K);
  return {a.y, a.rstd};
}
template <NormFwdKernel K>
Tensor4 add_layer_norm_fwd_op(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                              const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                              OptDtype out_dtype, double weight_offset) {
  auto a = norm_fwd_impl("ln_ext.add_layer_norm", x, residual, normalized_shape, weight, bias, eps, out_dtype,
                         residual_dtype, weight_offset, true, K);
  return {a.y, a.h, a.mean, a.rstd};
}
template <NormFwdKernel K>
Tensor3 add_rms_norm_fwd_op(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                            const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype,
                            double weight_offset) {
  auto a = norm_fwd_impl("ln_ext.add_rms_norm", x, residual, normalized_shape, weight, std::nullopt, eps, out_dtype,
                         residual_dtype, weight_offset, false, K);
  return {a.y, a.h, a.rstd};
}
// RMSNorm's rows of one element: x and rstd (valid ones, checked by the caller) have as many.
inline bool single_element_rows(const at::Tensor& x, const at::Tensor& rstd) {
  return x.numel() > 0 && x.numel() == rstd.numel();
}
// dx of RMSNorm over one element, rstd * g * (1 - xhat^2) (+ grad_h), g = dy * gain, in rstd's
// precision, with 1 - xhat^2 = eps * rstd^2 where xhat^2 is near 1: the general formula forms
// it by cancellation. rstd_b: rstd viewed to broadcast against x.
at::Tensor single_element_rms_dx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd_b,
                                 const OptTensor& weight, double weight_offset, double eps, const OptTensor& grad_h);

template <NormBwdKernel K>
Tensor3 layer_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                          const OptTensor& weight, const OptTensor& bias, std::array<bool, 3> output_mask,
                          const OptTensor& grad_h, double weight_offset) {
  auto g = norm_bwd_impl("ln_ext.layer_norm", dy, x, mean, rstd, weight, bias, output_mask, grad_h, weight_offset,
                         true, K);
  return {g[0], g[1], g[2]};
}
template <NormBwdKernel K>
Tensor2 rms_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const OptTensor& weight,
                        std::array<bool, 2> output_mask, const OptTensor& grad_h, double weight_offset,
                        std::optional<double> eps) {
  const bool exact_dx = output_mask[0] && eps && single_element_rows(x, rstd);
  auto g = norm_bwd_impl("ln_ext.rms_norm", dy, x, std::nullopt, rstd, weight, std::nullopt,
                         {output_mask[0] && !exact_dx, output_mask[1], false}, grad_h, weight_offset, false, K);
  if (exact_dx) {
    std::vector<int64_t> rows_of_one(rstd.sizes().begin(), rstd.sizes().end());
    rows_of_one.resize(x.dim(), 1);
    g[0] = single_element_rms_dx(dy, x, rstd.view(rows_of_one), weight, weight_offset, *eps, grad_h);
  }
  return {g[0], g[1]};
}

// Registers every op of the norm family for one device key.
template <NormFwdKernel Fwd, NormBwdKernel Bwd>
void register_norm_ops(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_op<Fwd>);
  m.impl("layer_norm_bwd", &layer_norm_bwd_op<Bwd>);
  m.impl("rms_norm_fwd", &rms_norm_fwd_op<Fwd>);
  m.impl("rms_norm_bwd", &rms_norm_bwd_op<Bwd>);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_op<Fwd>);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_op<Fwd>);
}

// The ops through the dispatcher (autograd, autocast, device and fake kernels
// included), for C++ callers: the autograd backward and the Python fast paths.
Tensor3 call_layer_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                            const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset);
Tensor3 call_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                            const OptTensor& weight, const OptTensor& bias, std::array<bool, 3> output_mask,
                            const OptTensor& grad_h, double weight_offset);
Tensor2 call_rms_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, double eps,
                          OptDtype out_dtype, double weight_offset);
Tensor2 call_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const OptTensor& weight,
                          std::array<bool, 2> output_mask, const OptTensor& grad_h, double weight_offset,
                          std::optional<double> eps);
Tensor4 call_add_layer_norm_fwd(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                                const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                                OptDtype out_dtype, double weight_offset);
Tensor3 call_add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                              const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype,
                              double weight_offset);

// ---- Channels-first norms (csrc/channels_first.cpp): LayerNorm / RMSNorm over dim 1 of
// x: [B, C, *spatial], viewed as [B, C, S]; one norm per (b, s) over the C channels, NCHW as
// it is (no permute). weight/bias: [C]; mean/rstd: x.shape without dim 1 ([B, S]).
struct ChannelNormFwdArgs {
  at::Tensor x, weight, bias;  // contiguous
  at::Tensor y, mean, rstd;    // mean: LayerNorm only
  int64_t batch = 0, channels = 0, spatial = 0;
  double eps = 0, weight_offset = 0;
  bool centered = true;
};
struct ChannelNormBwdArgs {
  at::Tensor dy, x, mean, rstd, weight;  // contiguous
  at::Tensor dx, dweight, dbias;         // undefined: not asked for
  int64_t batch = 0, channels = 0, spatial = 0;
  double weight_offset = 0;
  bool centered = true;
};
using ChannelNormFwdKernel = void (*)(const ChannelNormFwdArgs&);
using ChannelNormBwdKernel = void (*)(const ChannelNormBwdArgs&);

ChannelNormFwdArgs channel_norm_fwd_impl(const char* op, const at::Tensor& x, const OptTensor& weight,
                                         const OptTensor& bias, double eps, double weight_offset, OptDtype out_dtype,
                                         bool centered, ChannelNormFwdKernel kernel);
std::array<at::Tensor, 3> channel_norm_bwd_impl(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                                const OptTensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                                                const OptTensor& bias, std::array<bool, 3> output_mask,
                                                double weight_offset, bool centered, ChannelNormBwdKernel kernel);

template <ChannelNormFwdKernel K>
Tensor3 channels_first_layer_norm_fwd_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                         double eps, double weight_offset, OptDtype out_dtype) {
  auto a = channel_norm_fwd_impl("ln_ext.layer_norm_channels_first", x, weight, bias, eps, weight_offset, out_dtype,
                                 true, K);
  return {a.y, a.mean, a.rstd};
}
template <ChannelNormFwdKernel K>
Tensor2 channels_first_rms_norm_fwd_op(const at::Tensor& x, const OptTensor& weight, double eps, double weight_offset,
                                       OptDtype out_dtype) {
  auto a = channel_norm_fwd_impl("ln_ext.rms_norm_channels_first", x, weight, std::nullopt, eps, weight_offset,
                                 out_dtype, false, K);
  return {a.y, a.rstd};
}
template <ChannelNormBwdKernel K>
Tensor3 channels_first_layer_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                                         std::array<bool, 3> output_mask, double weight_offset) {
  auto g = channel_norm_bwd_impl("ln_ext.layer_norm_channels_first", dy, x, mean, rstd, weight, bias, output_mask,
                                 weight_offset, true, K);
  return {g[0], g[1], g[2]};
}
template <ChannelNormBwdKernel K>
Tensor2 channels_first_rms_norm_bwd_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                       const OptTensor& weight, std::array<bool, 2> output_mask, double weight_offset,
                                       std::optional<double> eps) {
  const bool exact_dx = output_mask[0] && eps && single_element_rows(x, rstd);  // C = 1 (rms_norm_bwd_op)
  auto g = channel_norm_bwd_impl("ln_ext.rms_norm_channels_first", dy, x, std::nullopt, rstd, weight, std::nullopt,
                                 {output_mask[0] && !exact_dx, output_mask[1], false}, weight_offset, false, K);
  if (exact_dx) g[0] = single_element_rms_dx(dy, x, rstd.unsqueeze(1), weight, weight_offset, *eps, std::nullopt);
  return {g[0], g[1]};
}
template <ChannelNormFwdKernel Fwd, ChannelNormBwdKernel Bwd>
void register_channel_norm_ops(torch::Library& m) {
  m.impl("channels_first_layer_norm_fwd", &channels_first_layer_norm_fwd_op<Fwd>);
  m.impl("channels_first_rms_norm_fwd", &channels_first_rms_norm_fwd_op<Fwd>);
  m.impl("channels_first_layer_norm_bwd", &channels_first_layer_norm_bwd_op<Bwd>);
  m.impl("channels_first_rms_norm_bwd", &channels_first_rms_norm_bwd_op<Bwd>);
}
Tensor3 call_channels_first_layer_norm_fwd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                           double eps, double weight_offset, OptDtype out_dtype);
Tensor2 call_channels_first_rms_norm_fwd(const at::Tensor& x, const OptTensor& weight, double eps,
                                         double weight_offset, OptDtype out_dtype);
Tensor3 call_channels_first_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                                           std::array<bool, 3> output_mask, double weight_offset);
Tensor2 call_channels_first_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                         const OptTensor& weight, std::array<bool, 2> output_mask,
                                         double weight_offset, std::optional<double> eps);

// Kernel entry points.
void channel_norm_fwd_cpu_kernel(const ChannelNormFwdArgs& args);
void channel_norm_bwd_cpu_kernel(const ChannelNormBwdArgs& args);
#ifdef LN_EXT_WITH_CUDA
void channel_norm_fwd_cuda_kernel(const ChannelNormFwdArgs& args);
void channel_norm_bwd_cuda_kernel(const ChannelNormBwdArgs& args);
#endif
void norm_fwd_cpu_kernel(const NormFwdArgs& args);
void norm_bwd_cpu_kernel(const NormBwdArgs& args);
#ifdef LN_EXT_WITH_CUDA
void norm_fwd_cuda_kernel(const NormFwdArgs& args);
void norm_bwd_cuda_kernel(const NormBwdArgs& args);
#endif

}  // namespace ln_ext
