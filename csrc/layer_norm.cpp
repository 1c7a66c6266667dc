// Device-independent bodies of the norm family's ops (LayerNorm, RMSNorm, add + norm):
// every argument check lives here so that the CPU and CUDA ops reject bad input
// identically.
#include "layer_norm.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>

namespace ln_ext {

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

void check_input_dtype(const char* op, const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || is_reduced_float(t), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t);
}

// The accepted second dtype of a reduced-precision tensor: float32.
bool dtype_matches(at::ScalarType got, at::ScalarType x_dtype) {
  return got == x_dtype || (is_reduced_float(x_dtype) && got == at::kFloat);
}

void check_same_device(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              x.device());
}

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_param(const char* op, const std::optional<at::Tensor>& p, const at::Tensor& x,
                 at::IntArrayRef normalized_shape, const char* name) {
  if (!defined(p)) return;
  check_same_device(op, *p, x, name);
  TORCH_CHECK(p->sizes() == normalized_shape, op, ": ", name, " must have shape normalized_shape=",
              normalized_shape, ", got ", p->sizes());
  TORCH_CHECK(dtype_matches(p->scalar_type(), x.scalar_type()), op, ": ", name,
              " must have the input's dtype (", x.scalar_type(), ")",
              is_reduced_float(x.scalar_type()) ? " or float32" : "", ", got ", p->scalar_type());
}

// weight and bias each valid, and of one dtype: the kernels take a single parameter type.
void check_params(const char* op, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x, at::IntArrayRef normalized_shape) {
  check_param(op, weight, x, normalized_shape, "weight");
  check_param(op, bias, x, normalized_shape, "bias");
  TORCH_CHECK(!(defined(weight) && defined(bias)) || weight->scalar_type() == bias->scalar_type(), op,
              ": weight and bias must share a dtype, got ", weight->scalar_type(), " and ", bias->scalar_type());
}

void check_backward_inputs(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd) {
  check_input_dtype(op, x, "input");
  check_input_dtype(op, dy, "grad_output");
  check_same_device(op, dy, x, "grad_output");
  check_same_device(op, rstd, x, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": grad_output must have the input's shape ", x.sizes(), ", got ",
              dy.sizes());
  TORCH_CHECK(dtype_matches(dy.scalar_type(), x.scalar_type()), op, ": grad_output must have the input's dtype (",
              x.scalar_type(), ") or float32, got ", dy.scalar_type());
}

// The gain is weight_offset + weight: an offset has nothing to shift without a weight.
void check_weight_offset(const char* op, double weight_offset, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(weight_offset == 0 || defined(weight), op, ": weight_offset=", weight_offset,
              " needs a weight (the gain is weight_offset + weight)");
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return defined(t) ? t->contiguous() : at::Tensor();
}

at::ScalarType stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// Checks that normalized_shape names the trailing dims of x; returns (M, N).
std::pair<int64_t, int64_t> rows_and_cols(const char* op, const at::Tensor& x, at::IntArrayRef normalized_shape) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": normalized_shape must name at least one dim");
  TORCH_CHECK(x.dim() >= k && x.sizes().slice(x.dim() - k) == normalized_shape, op, ": normalized_shape=",
              normalized_shape, " must equal the trailing dims of input of shape ", x.sizes());
  int64_t cols = 1;
  for (auto d : normalized_shape) cols *= d;
  int64_t rows = 1;
  for (const auto i : c10::irange(x.dim() - k)) rows *= x.size(i);
  return {rows, cols};
}

// The residual of an add + norm, in the dtype of h = x + residual (residual_dtype,
// default the residual's own: x's dtype or, beside a 16-bit x, float32), contiguous.
at::Tensor residual_as_h(const char* op, const at::Tensor& residual, const at::Tensor& x,
                         std::optional<at::ScalarType> residual_dtype) {
  check_input_dtype(op, residual, "residual");
  check_same_device(op, residual, x, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have the input's shape ", x.sizes(), ", got ",
              residual.sizes());
  const auto h_dtype = residual_dtype.value_or(residual.scalar_type());
  TORCH_CHECK(dtype_matches(h_dtype, x.scalar_type()), op, ": the residual stream (residual_dtype, else the "
              "residual's dtype) must be the input's dtype (", x.scalar_type(), ")",
              is_reduced_float(x.scalar_type()) ? " or float32" : "", ", got ", h_dtype);
  // A residual in another dtype than the stream it joins: converted first (one more pass).
  return residual.to(h_dtype).contiguous();
}

}  // namespace

NormFwdArgs norm_fwd_impl(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          std::optional<at::ScalarType> out_dtype, std::optional<at::ScalarType> residual_dtype,
                          double weight_offset, bool centered, NormFwdKernel kernel) {
  check_input_dtype(op, x, "input");
  const auto [rows, cols] = rows_and_cols(op, x, normalized_shape);
  check_params(op, weight, bias, x, normalized_shape);
  check_weight_offset(op, weight_offset, weight);
  const auto y_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(dtype_matches(y_dtype, x.scalar_type()), op, ": out_dtype must be the input's dtype or, for a "
              "float16/bfloat16 input, float32; got ", y_dtype);

  NormFwdArgs a;
  a.centered = centered;
  a.x = x.contiguous();
  a.weight = contiguous_or_undefined(weight);
  a.bias = contiguous_or_undefined(bias);
  a.rows = rows;
  a.cols = cols;
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.y = at::empty(x.sizes(), x.options().dtype(y_dtype));
  if (residual.has_value()) {
    a.residual = residual_as_h(op, *residual, x, residual_dtype);
    a.h = at::empty(x.sizes(), a.residual.options());
  }
  const auto stats_shape = x.sizes().slice(0, x.dim() - normalized_shape.size());
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  if (centered) a.mean = at::empty(stats_shape, stats_opts);
  a.rstd = at::empty(stats_shape, stats_opts);
  if (rows > 0 && cols == 0) {  // as aten: the mean of nothing is 0, its spread undefined
    if (a.mean.defined()) a.mean.zero_();
    a.rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (rows > 0) {
    kernel(a);
  }
  return a;
}

std::array<at::Tensor, 3> norm_bwd_impl(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                        const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                        std::array<bool, 3> output_mask, const std::optional<at::Tensor>& grad_h,
                                        double weight_offset, bool centered, NormBwdKernel kernel) {
  check_backward_inputs(op, dy, x, rstd);
  // The normalized dims are those rstd (and mean) leave out.
  const char* stats_name = centered ? "mean and rstd" : "rstd";
  TORCH_CHECK(!centered || mean.has_value(), op, ": mean is required");
  if (centered) check_same_device(op, *mean, x, "mean");
  const int64_t k = x.dim() - rstd.dim();
  TORCH_CHECK(k >= 1 && rstd.sizes() == x.sizes().slice(0, rstd.dim()) && (!centered || mean->sizes() == rstd.sizes()),
              op, ": ", stats_name, " must have the input's leading dims, got ",
              centered ? mean->sizes() : rstd.sizes(), " and ", rstd.sizes(), " for input ", x.sizes());
  const auto stats_t = stats_dtype(x.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == stats_t && (!centered || mean->scalar_type() == stats_t), op, ": ",
              stats_name, " must be ", stats_t, ", got ", rstd.scalar_type());
  if (defined(grad_h)) {
    check_same_device(op, *grad_h, x, "grad_h");
    TORCH_CHECK(grad_h->sizes() == x.sizes() && grad_h->scalar_type() == x.scalar_type(), op,
                ": grad_h must have the input's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
                grad_h->sizes(), " ", grad_h->scalar_type());
  }
  const auto normalized_shape = x.sizes().slice(x.dim() - k);
  const auto [rows, cols] = rows_and_cols(op, x, normalized_shape);
  check_params(op, weight, bias, x, normalized_shape);
  check_weight_offset(op, weight_offset, weight);

  NormBwdArgs a;
  a.centered = centered;
  a.weight_offset = weight_offset;
  a.dy = dy.contiguous();
  a.x = x.contiguous();
  if (centered) a.mean = mean->contiguous();
  a.rstd = rstd.contiguous();
  a.weight = contiguous_or_undefined(weight);
  a.dh = contiguous_or_undefined(grad_h);
  a.rows = rows;
  a.cols = cols;
  std::tie(a.dx, a.dweight, a.dbias) = std::tuple_cat(new_grads(x, weight, bias, output_mask));
  if (rows == 0 || cols == 0) {  // no row contributes: parameter grads are zero, dx is dh
    if (a.dweight.defined()) a.dweight.zero_();
    if (a.dbias.defined()) a.dbias.zero_();
    if (a.dx.defined() && a.dh.defined()) a.dx.copy_(a.dh);
  } else if (a.dx.defined() || a.dweight.defined() || a.dbias.defined()) {
    kernel(a);
  }
  return grads_as_outputs(x, {a.dx, a.dweight, a.dbias});
}

std::array<at::Tensor, 3> new_grads(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask) {
  const auto like = [](const std::optional<at::Tensor>& p, bool asked) {
    return asked && defined(p) ? at::empty_like(*p, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  return {output_mask[0] ? at::empty(x.sizes(), x.options()) : at::Tensor(), like(weight, output_mask[1]),
          like(bias, output_mask[2])};
}

std::array<at::Tensor, 3> grads_as_outputs(const at::Tensor& x, const std::array<at::Tensor, 3>& grads) {
  std::array<at::Tensor, 3> out;
  for (size_t i = 0; i < grads.size(); ++i) out[i] = grads[i].defined() ? grads[i] : x.new_empty({0});
  return out;
}

Tensor3 call_layer_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                            const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset) {
  static const auto op = op_handle<decltype(call_layer_norm_fwd)>("ln_ext::layer_norm_fwd");
  return op.call(x, normalized_shape, weight, bias, eps, out_dtype, weight_offset);
}

Tensor3 call_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                            const OptTensor& weight, const OptTensor& bias, std::array<bool, 3> output_mask,
                            const OptTensor& grad_h, double weight_offset) {
  static const auto op = op_handle<decltype(call_layer_norm_bwd)>("ln_ext::layer_norm_bwd");
  return op.call(dy, x, mean, rstd, weight, bias, output_mask, grad_h, weight_offset);
}

Tensor2 call_rms_norm_fwd(const at::Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, double eps,
                          OptDtype out_dtype, double weight_offset) {
  static const auto op = op_handle<decltype(call_rms_norm_fwd)>("ln_ext::rms_norm_fwd");
  return op.call(x, normalized_shape, weight, eps, out_dtype, weight_offset);
}

Tensor2 call_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const OptTensor& weight,
                          std::array<bool, 2> output_mask, const OptTensor& grad_h, double weight_offset,
                          std::optional<double> eps) {
  static const auto op = op_handle<decltype(call_rms_norm_bwd)>("ln_ext::rms_norm_bwd");
  return op.call(dy, x, rstd, weight, output_mask, grad_h, weight_offset, eps);
}

at::Tensor single_element_rms_dx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd_b,
                                 const OptTensor& weight, double weight_offset, double eps, const OptTensor& grad_h) {
  const auto acc = rstd_b.scalar_type();
  // 1 - xhat^2, as itself where xhat^2 < 1/2 (no cancellation there, fewer roundings than
  // eps * rstd^2) and as eps * rstd^2 above.
  const at::Tensor xhat_sq = (x.to(acc) * rstd_b).square();
  const at::Tensor one_minus_xhat_sq = at::where(xhat_sq < 0.5, 1 - xhat_sq, rstd_b * rstd_b * eps);
  at::Tensor dx = dy.to(acc) * (rstd_b * one_minus_xhat_sq);
  // An absent weight is a gain of 1 whatever the offset (as in the kernels).
  if (defined(weight)) dx = dx * (weight->to(acc) + weight_offset);
  if (defined(grad_h)) dx = dx + grad_h->to(acc);
  return dx.to(x.scalar_type()).contiguous();
}

Tensor4 call_add_layer_norm_fwd(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                                const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                                OptDtype out_dtype, double weight_offset) {
  static const auto op = op_handle<decltype(call_add_layer_norm_fwd)>("ln_ext::add_layer_norm_fwd");
  return op.call(x, residual, normalized_shape, weight, bias, eps, residual_dtype, out_dtype, weight_offset);
}

Tensor3 call_add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
                              const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype,
                              double weight_offset) {
  static const auto op = op_handle<decltype(call_add_rms_norm_fwd)>("ln_ext::add_rms_norm_fwd");
  return op.call(x, residual, normalized_shape, weight, eps, residual_dtype, out_dtype, weight_offset);
}

}  // namespace ln_ext
