// Autograd of the norm family's forward ops, registered in C++ at the Autograd key: a
// Python autograd wrapper costs more per call than a small LayerNorm itself takes.
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

// (dx, dweight, dbias) of the norm of x in differentiable ATen ops, computed in float32
// or better. x: [..., normalized dims]; the last `k` dims are normalized. centered:
// LayerNorm; else RMSNorm (no mean; dbias is not used).
std::array<Tensor, 3> composite_grads(const Tensor& dy, const Tensor& x, const Tensor& weight, double weight_offset,
                                      int64_t k, double eps, bool centered) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xa = x.to(acc), dya = dy.to(acc);
  std::vector<int64_t> dims, row_dims;
  for (int64_t d = 0; d < x.dim(); ++d) (d < x.dim() - k ? row_dims : dims).push_back(d);
  const Tensor centered_x = centered ? xa - xa.mean(dims, /*keepdim=*/true) : xa;
  const Tensor rstd = (centered_x.square().mean(dims, true) + eps).rsqrt();
  const Tensor xhat = centered_x * rstd;
  const Tensor g = weight.defined() ? dya * (weight.to(acc) + weight_offset) : dya;
  const Tensor g_c = centered ? g - g.mean(dims, true) : g;
  const Tensor dx = rstd * (g_c - xhat * (g * xhat).mean(dims, true));
  // sum over no dims must stay a no-op (at::sum with an empty list sums everything).
  const auto row_sum = [&](const Tensor& t) { return row_dims.empty() ? t : t.sum(row_dims); };
  return {dx, row_sum(dya * xhat), row_sum(dya)};
}

// A tensor in a dtype the backward kernels take beside their input `x`: as it is, or
// float32 (a 16-bit dy or parameter beside the float32 h of an add + norm whose x was
// 16-bit: the kernels' chunk grid has no narrower element than its input's).
Tensor for_kernel(const Tensor& t, const Tensor& x) {
  if (!t.defined() || t.scalar_type() == x.scalar_type()) return t;
  const bool t_reduced = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  return (t_reduced && x.scalar_type() == at::kFloat) ? t.to(at::kFloat) : t;
}

// What a backward needs to know of its forward call besides the saved tensors, packed in one
// integer of the context's saved_data (a map of strings: each entry costs an allocation
// and a hash, on every training step).
struct CallFacts {
  bool centered, add, need_x, need_residual, need_w, need_b;
  at::ScalarType x_dtype, residual_dtype;
  int64_t k;  // len(normalized_shape)

  int64_t pack() const {
    const int64_t bits = centered | add << 1 | need_x << 2 | need_residual << 3 | need_w << 4 | need_b << 5;
    return bits | static_cast<int64_t>(x_dtype) << 8 | static_cast<int64_t>(residual_dtype) << 16 | k << 24;
  }
  static CallFacts unpack(int64_t v) {
    const auto bit = [v](int i) { return ((v >> i) & 1) != 0; };
    return {bit(0), bit(1), bit(2), bit(3), bit(4), bit(5), static_cast<at::ScalarType>((v >> 8) & 0xff),
            static_cast<at::ScalarType>((v >> 16) & 0xff), v >> 24};
  }
};

// Autograd of every forward op of the norm family: LayerNorm or RMSNorm (centered) of x,
// or of h = x + residual (residual given), returning y, h (add + norm), mean (LayerNorm)
// and rstd, in that order: only the outputs the op has (autograd takes no undefined ones).
// The gain is weight_offset + weight. First derivatives call the backward ops (the fused
// kernels); with create_graph=True the backward is written with differentiable ATen ops,
// so second derivatives (as nn.LayerNorm supports) come from autograd.
class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& residual_opt,
                               at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, double eps,
                               std::optional<at::ScalarType> residual_dtype,
                               std::optional<at::ScalarType> out_dtype, double weight_offset, bool centered) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // mean/rstd never get gradients: don't have autograd build zero tensors for them.
    ctx->set_materialize_grads(false);
    Tensor y, h, mean, rstd;
    const Tensor residual = residual_opt.value_or(Tensor());
    const bool add = residual.defined();
    if (add && centered) {
      std::tie(y, h, mean, rstd) = call_add_layer_norm_fwd(x, residual, normalized_shape, weight, bias, eps,
                                                           residual_dtype, out_dtype, weight_offset);
    } else if (add) {
      std::tie(y, h, rstd) = call_add_rms_norm_fwd(x, residual, normalized_shape, weight, eps, residual_dtype,
                                                   out_dtype, weight_offset);
    } else if (centered) {
      std::tie(y, mean, rstd) = call_layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype, weight_offset);
    } else {
      std::tie(y, rstd) = call_rms_norm_fwd(x, normalized_shape, weight, eps, out_dtype, weight_offset);
    }
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    ctx->save_for_backward({add ? h : x, mean, rstd, w, b});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight_offset"] = weight_offset;
    ctx->saved_data["facts"] = CallFacts{centered,
                                         add,
                                         x.requires_grad(),
                                         add && residual.requires_grad(),
                                         w.defined() && w.requires_grad(),
                                         b.defined() && b.requires_grad(),
                                         x.scalar_type(),
                                         add ? residual.scalar_type() : x.scalar_type(),
                                         static_cast<int64_t>(normalized_shape.size())}
                                   .pack();
    variable_list outputs{y};
    if (add) outputs.push_back(h);
    if (centered) outputs.push_back(mean);
    outputs.push_back(rstd);
    ctx->mark_non_differentiable(centered ? variable_list{mean, rstd} : variable_list{rstd});
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &in = saved[0], &mean = saved[1], &rstd = saved[2], &w = saved[3], &b = saved[4];
    const Tensor& dy = grads[0];
    const CallFacts facts = CallFacts::unpack(ctx->saved_data["facts"].toInt());
    const Tensor dh = facts.add ? grads[1] : Tensor();  // the gradient of h
    const bool centered = facts.centered, need_x = facts.need_x, need_residual = facts.need_residual;
    const bool need_w = facts.need_w, need_b = facts.need_b;
    const double weight_offset = ctx->saved_data["weight_offset"].toDouble();
    Tensor d_in, dw, db;  // d_in: the gradient of the norm's input, x or h
    if (dy.defined() && torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      auto g = composite_grads(dy, in, w, weight_offset, facts.k, ctx->saved_data["eps"].toDouble(), centered);
      d_in = g[0].to(in.scalar_type());
      if (dh.defined()) d_in = d_in + dh;
      if (need_w) dw = g[1].to(w.scalar_type());
      if (need_b) db = g[2].to(b.scalar_type());
    } else if (dy.defined()) {
      // Straight to the device kernel: the backward op has no autograd of its own, and the
      // dispatcher's autograd fallback would check every argument again.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Tensor dy_k = for_kernel(dy, in), w_k = for_kernel(w, in), b_k = for_kernel(b, in);
      const bool want_in = need_x || need_residual;
      if (centered) {
        std::tie(d_in, dw, db) = call_layer_norm_bwd(dy_k, in, mean, rstd, defined_or_none(w_k), defined_or_none(b_k),
                                                     {want_in, need_w, need_b}, defined_or_none(dh), weight_offset);
      } else {
        std::tie(d_in, dw) = call_rms_norm_bwd(dy_k, in, rstd, defined_or_none(w_k), {want_in, need_w},
                                               defined_or_none(dh), weight_offset);
      }
      if (need_w) dw = dw.to(w.scalar_type());
      if (need_b) db = db.to(b.scalar_type());
    } else if (dh.defined()) {  // only h is used downstream: the norm passes nothing back
      d_in = dh;
    }
    const auto as = [&](at::ScalarType dtype) { return d_in.defined() ? d_in.to(dtype) : Tensor(); };
    // One gradient per forward argument: x, residual, normalized_shape, weight, bias, eps,
    // residual_dtype, out_dtype, weight_offset, centered.
    return {need_x ? as(facts.x_dtype) : Tensor(), need_residual ? as(facts.residual_dtype) : Tensor(), Tensor(),
            need_w ? dw : Tensor(), need_b ? db : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Whether a call must record a graph node: grad mode on and an input that requires grad.
// Otherwise the Autograd kernels go straight to the device kernel (no node, no saved
// tensors: an autograd::Function's apply costs about a microsecond even when it records
// nothing, a quarter of a small LayerNorm's whole call).
bool records_graph(const Tensor& x, const OptTensor& a, const OptTensor& b, const OptTensor& c = std::nullopt) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  const auto wants = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return x.requires_grad() || wants(a) || wants(b) || wants(c);
}

Tensor3 layer_norm_fwd_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset) {
  if (!records_graph(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype, weight_offset);
  }
  auto o = NormFunction::apply(x, std::nullopt, normalized_shape, weight, bias, eps, std::nullopt, out_dtype,
                               weight_offset, true);
  return {o[0], o[1], o[2]};
}

Tensor2 rms_norm_fwd_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, double eps,
                              OptDtype out_dtype, double weight_offset) {
  if (!records_graph(x, weight, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_rms_norm_fwd(x, normalized_shape, weight, eps, out_dtype, weight_offset);
  }
  auto o = NormFunction::apply(x, std::nullopt, normalized_shape, weight, std::nullopt, eps, std::nullopt,
                               out_dtype, weight_offset, false);
  return {o[0], o[1]};
}

Tensor4 add_layer_norm_fwd_autograd(const Tensor& x, const Tensor& residual, at::IntArrayRef normalized_shape,
                                    const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                                    OptDtype out_dtype, double weight_offset) {
  if (!records_graph(x, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_add_layer_norm_fwd(x, residual, normalized_shape, weight, bias, eps, residual_dtype, out_dtype,
                                   weight_offset);
  }
  auto o = NormFunction::apply(x, residual, normalized_shape, weight, bias, eps, residual_dtype, out_dtype,
                               weight_offset, true);
  return {o[0], o[1], o[2], o[3]};
}

Tensor3 add_rms_norm_fwd_autograd(const Tensor& x, const Tensor& residual, at::IntArrayRef normalized_shape,
                                  const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype,
                                  double weight_offset) {
  if (!records_graph(x, residual, weight)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_add_rms_norm_fwd(x, residual, normalized_shape, weight, eps, residual_dtype, out_dtype,
                                 weight_offset);
  }
  auto o = NormFunction::apply(x, residual, normalized_shape, weight, std::nullopt, eps, residual_dtype, out_dtype,
                               weight_offset, false);
  return {o[0], o[1], o[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_autograd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_autograd);
}

}  // namespace ln_ext
