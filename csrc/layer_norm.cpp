// Device-independent bodies of layer_norm_fwd / layer_norm_bwd: every argument
// check lives here so that the CPU and CUDA ops reject bad input identically.
#include "layer_norm.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>

namespace ln_ext {
namespace {

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

void check_input_dtype(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || is_reduced_float(t),
              "ln_ext.layer_norm: ", name,
              " must be float32, float64, float16 or bfloat16, got ", t);
}

// The accepted second dtype of a reduced-precision tensor: float32.
bool dtype_matches(at::ScalarType got, at::ScalarType x_dtype) {
  return got == x_dtype || (is_reduced_float(x_dtype) && got == at::kFloat);
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "ln_ext.layer_norm: ", name,
              " is on ", t.device(), " but input is on ", x.device());
}

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x,
                 at::IntArrayRef normalized_shape, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  check_same_device(*p, x, name);
  TORCH_CHECK(p->sizes() == normalized_shape, "ln_ext.layer_norm: ", name,
              " must have shape normalized_shape=", normalized_shape, ", got ",
              p->sizes());
  TORCH_CHECK(dtype_matches(p->scalar_type(), x.scalar_type()),
              "ln_ext.layer_norm: ", name, " must have the input's dtype (",
              x.scalar_type(), ")",
              is_reduced_float(x.scalar_type()) ? " or float32" : "", ", got ",
              p->scalar_type());
}

// weight and bias each valid, and of one dtype: the kernels take a single parameter type.
void check_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x, at::IntArrayRef normalized_shape) {
  check_param(weight, x, normalized_shape, "weight");
  check_param(bias, x, normalized_shape, "bias");
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(!(has_w && has_b) || weight->scalar_type() == bias->scalar_type(),
              "ln_ext.layer_norm: weight and bias must share a dtype, got ",
              weight->scalar_type(), " and ", bias->scalar_type());
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

// Checks that normalized_shape names the trailing dims of x; returns (M, N).
std::pair<int64_t, int64_t> rows_and_cols(const at::Tensor& x,
                                          at::IntArrayRef normalized_shape) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "ln_ext.layer_norm: normalized_shape must name at least one dim");
  TORCH_CHECK(x.dim() >= k && x.sizes().slice(x.dim() - k) == normalized_shape,
              "ln_ext.layer_norm: normalized_shape=", normalized_shape,
              " must equal the trailing dims of input of shape ", x.sizes());
  int64_t cols = 1;
  for (auto d : normalized_shape) cols *= d;
  int64_t rows = 1;
  for (const auto i : c10::irange(x.dim() - k)) rows *= x.size(i);
  return {rows, cols};
}

at::ScalarType stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_impl(
    const at::Tensor& x, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype, LayerNormFwdKernel kernel) {
  check_input_dtype(x, "input");
  const auto [rows, cols] = rows_and_cols(x, normalized_shape);
  check_params(weight, bias, x, normalized_shape);
  const auto y_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(dtype_matches(y_dtype, x.scalar_type()),
              "ln_ext.layer_norm: out_dtype must be the input's dtype or, for a "
              "float16/bfloat16 input, float32; got ", y_dtype);

  LayerNormFwdArgs args;
  args.x = x.contiguous();
  args.weight = contiguous_or_undefined(weight);
  args.bias = contiguous_or_undefined(bias);
  args.rows = rows;
  args.cols = cols;
  args.eps = eps;
  args.y = at::empty(x.sizes(), x.options().dtype(y_dtype));
  const auto stats_shape = x.sizes().slice(0, x.dim() - normalized_shape.size());
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  args.mean = at::empty(stats_shape, stats_opts);
  args.rstd = at::empty(stats_shape, stats_opts);
  if (rows > 0 && cols == 0) {  // as aten: the mean of nothing is 0, its spread undefined
    args.mean.zero_();
    args.rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (rows > 0) {
    kernel(args);
  }
  return {args.y, args.mean, args.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_impl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask,
    LayerNormBwdKernel kernel) {
  check_input_dtype(x, "input");
  check_input_dtype(dy, "grad_output");
  check_same_device(dy, x, "grad_output");
  check_same_device(mean, x, "mean");
  check_same_device(rstd, x, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "ln_ext.layer_norm: grad_output must have the "
              "input's shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dtype_matches(dy.scalar_type(), x.scalar_type()),
              "ln_ext.layer_norm: grad_output must have the input's dtype (",
              x.scalar_type(), ") or float32, got ", dy.scalar_type());
  // The normalized dims are those of weight/bias, or else those mean/rstd leave out.
  const int64_t k = x.dim() - mean.dim();
  TORCH_CHECK(k >= 1 && mean.sizes() == x.sizes().slice(0, mean.dim()) &&
                  rstd.sizes() == mean.sizes(),
              "ln_ext.layer_norm: mean and rstd must have the input's leading dims, got ",
              mean.sizes(), " and ", rstd.sizes(), " for input ", x.sizes());
  const auto stats_t = stats_dtype(x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == stats_t && rstd.scalar_type() == stats_t,
              "ln_ext.layer_norm: mean and rstd must be ", stats_t, ", got ",
              mean.scalar_type(), " and ", rstd.scalar_type());
  const auto normalized_shape = x.sizes().slice(x.dim() - k);
  const auto [rows, cols] = rows_and_cols(x, normalized_shape);
  check_params(weight, bias, x, normalized_shape);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();

  LayerNormBwdArgs args;
  args.dy = dy.contiguous();
  args.x = x.contiguous();
  args.mean = mean.contiguous();
  args.rstd = rstd.contiguous();
  args.weight = contiguous_or_undefined(weight);
  args.rows = rows;
  args.cols = cols;
  // Outputs not asked for (or without a parameter) come back as empty [0] tensors,
  // each its own: outputs of an op must not alias one another.
  const auto none = [&x] { return x.new_empty({0}); };
  args.dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::Tensor();
  args.dweight = (output_mask[1] && has_w) ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : at::Tensor();
  args.dbias = (output_mask[2] && has_b) ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : at::Tensor();
  if (rows == 0 || cols == 0) {  // no row contributes: parameter grads are zero
    if (args.dweight.defined()) args.dweight.zero_();
    if (args.dbias.defined()) args.dbias.zero_();
  } else if (args.dx.defined() || args.dweight.defined() || args.dbias.defined()) {
    kernel(args);
  }
  return {args.dx.defined() ? args.dx : none(),
          args.dweight.defined() ? args.dweight : none(),
          args.dbias.defined() ? args.dbias : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm_fwd(
    const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::optional<at::ScalarType> out_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ln_ext::layer_norm_fwd", "")
                             .typed<decltype(call_layer_norm_fwd)>();
  return op.call(x, normalized_shape, weight, bias, eps, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ln_ext::layer_norm_bwd", "")
                             .typed<decltype(call_layer_norm_bwd)>();
  return op.call(dy, x, mean, rstd, weight, bias, output_mask);
}

}  // namespace ln_ext
