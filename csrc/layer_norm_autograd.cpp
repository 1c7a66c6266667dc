// Autograd of layer_norm_fwd, registered in C++ at the Autograd key: a Python
// autograd wrapper costs more per call than a small LayerNorm itself takes.
//
// First derivatives call the layer_norm_bwd op (the fused kernels). With
// create_graph=True the backward is written with differentiable ATen ops instead,
// so second derivatives (as nn.LayerNorm supports) come from autograd.
#include "layer_norm.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace ln_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> defined_or_none(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// (dx, dweight, dbias) in differentiable ATen ops, computed in float32 or better.
// x: [..., normalized dims]; the last `k` dims are normalized.
std::array<Tensor, 3> composite_grads(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                      int64_t k, double eps) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xa = x.to(acc), dya = dy.to(acc);
  std::vector<int64_t> dims, row_dims;
  for (int64_t d = 0; d < x.dim(); ++d) (d < x.dim() - k ? row_dims : dims).push_back(d);
  const Tensor centered = xa - xa.mean(dims, /*keepdim=*/true);
  const Tensor rstd = (centered.square().mean(dims, true) + eps).rsqrt();
  const Tensor xhat = centered * rstd;
  const Tensor g = weight.defined() ? dya * weight.to(acc) : dya;
  const Tensor dx = rstd * (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true));
  // sum over no dims must stay a no-op (at::sum with an empty list sums everything).
  const auto row_sum = [&](const Tensor& t) { return row_dims.empty() ? t : t.sum(row_dims); };
  return {dx, row_sum(dya * xhat), row_sum(dya)};
}

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               at::IntArrayRef normalized_shape,
                               const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, double eps,
                               std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // mean/rstd never get gradients: don't have autograd build zero tensors for them.
    ctx->set_materialize_grads(false);
    auto [y, mean, rstd] = call_layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype);
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    ctx->save_for_backward({x, mean, rstd, w, b});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["k"] = static_cast<int64_t>(normalized_shape.size());
    ctx->saved_data["need_x"] = x.requires_grad();
    ctx->saved_data["need_w"] = w.defined() && w.requires_grad();
    ctx->saved_data["need_b"] = b.defined() && b.requires_grad();
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &w = saved[3], &b = saved[4];
    const Tensor& dy = grads[0];
    const bool need_x = ctx->saved_data["need_x"].toBool();
    const bool need_w = ctx->saved_data["need_w"].toBool();
    const bool need_b = ctx->saved_data["need_b"].toBool();
    Tensor dx, dw, db;
    if (dy.defined() && torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      auto grads3 = composite_grads(dy, x, w, ctx->saved_data["k"].toInt(),
                                    ctx->saved_data["eps"].toDouble());
      dx = grads3[0].to(x.scalar_type());
      if (need_w) dw = grads3[1].to(w.scalar_type());
      if (need_b) db = grads3[2].to(b.scalar_type());
    } else if (dy.defined()) {
      std::tie(dx, dw, db) = call_layer_norm_bwd(dy, x, mean, rstd, defined_or_none(w),
                                                 defined_or_none(b), {need_x, need_w, need_b});
    }
    // One gradient per forward argument: x, normalized_shape, weight, bias, eps, out_dtype.
    return {need_x ? dx : Tensor(), Tensor(), need_w ? dw : Tensor(),
            need_b ? db : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(
    const Tensor& x, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, std::optional<at::ScalarType> out_dtype) {
  auto out = LayerNormFunction::apply(x, normalized_shape, weight, bias, eps, out_dtype);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
}

}  // namespace ln_ext
