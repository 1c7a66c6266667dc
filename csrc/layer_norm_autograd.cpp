// Autograd of the norm family's forward ops, registered in C++ at the Autograd key: a
// Python autograd wrapper costs more per call than a small LayerNorm itself takes.
#include "layer_norm.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace ln_ext {
namespace {

using at::Tensor;
using torch::autograd::variable_list;

std::optional<Tensor> defined_or_none(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// (dx, dweight, dbias) of the norm of x in differentiable ATen ops, computed in float32
// or better. The last `k` dims of x are normalized or, channels_first, dim 1 (weight: [C]).
// centered: LayerNorm; else RMSNorm (no mean; dbias is not used).
std::array<Tensor, 3> composite_grads(const Tensor& dy, const Tensor& x, const Tensor& weight_in,
                                      double weight_offset, int64_t k, bool channels_first, double eps,
                                      bool centered) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xa = x.to(acc), dya = dy.to(acc);
  std::vector<int64_t> dims, row_dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    const bool normalized = channels_first ? d == 1 : d >= x.dim() - k;
    (normalized ? dims : row_dims).push_back(d);
  }
  Tensor weight = weight_in;
  if (channels_first && weight.defined()) {  // [C] -> [1, C, 1, ...]
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = x.size(1);
    weight = weight.reshape(shape);
  }
  const Tensor centered_x = centered ? xa - xa.mean(dims, /*keepdim=*/true) : xa;
  const Tensor rstd = (centered_x.square().mean(dims, true) + eps).rsqrt();
  const Tensor xhat = centered_x * rstd;
  const Tensor g = weight.defined() ? dya * (weight.to(acc) + weight_offset) : dya;
  const Tensor g_c = centered ? g - g.mean(dims, true) : g;
  const Tensor dx = rstd * (g_c - xhat * (g * xhat).mean(dims, true));
  // sum over no dims must stay a no-op (at::sum with an empty list sums everything).
  const auto row_sum = [&](const Tensor& t) { return row_dims.empty() ? t : t.sum(row_dims); };
  if (channels_first) return {dx, row_sum(dya * xhat), row_sum(dya)};  // [C]
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

// The graph node of every forward op of the norm family: LayerNorm or RMSNorm (centered) of x,
// or of h = x + residual (add + norm). Its inputs are the gradients of y (and h); its outputs
// those of x, residual, weight and bias. A Node of our own rather than an
// autograd::Function: the per-call bookkeeping of the latter (a context of named entries,
// every argument's metadata, an output per argument) costs microseconds, which is what a
// small LayerNorm's whole step takes. The gain is weight_offset + weight.
// First derivatives call the backward ops (the fused kernels); with create_graph=True the
// backward is written with differentiable ATen ops, so second derivatives (as nn.LayerNorm
// supports) come from autograd.
struct NormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable input, mean, rstd, weight, bias;  // input: x, or h (an output)
  double eps = 0, weight_offset = 0;
  int64_t k = 0;  // len(normalized_shape)
  bool centered = true, add = false, channels_first = false;
  at::ScalarType x_dtype = at::kFloat, residual_dtype = at::kFloat;

  std::string name() const override { return centered ? "LnExtLayerNormBackward" : "LnExtRMSNormBackward"; }

  void release_variables() override {
    for (auto* v : {&input, &mean, &rstd, &weight, &bias}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor in = input.unpack(getptr()), mu = mean.unpack(), rs = rstd.unpack();
    const Tensor w = weight.unpack(), b = bias.unpack();
    const Tensor& dy = grads[0];
    const Tensor dh = add ? grads[1] : Tensor();  // the gradient of h
    // Outputs: the gradients of x, residual, weight, bias (edges of absent or frozen ones: none).
    const bool need_x = task_should_compute_output(0), need_residual = add && task_should_compute_output(1);
    const bool need_w = w.defined() && task_should_compute_output(2);
    const bool need_b = b.defined() && task_should_compute_output(3);
    Tensor d_in, dw, db;  // d_in: the gradient of the norm's input, x or h
    if (dy.defined() && torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      auto g = composite_grads(dy, in, w, weight_offset, k, channels_first, eps, centered);
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
      if (channels_first && centered) {
        std::tie(d_in, dw, db) = call_channels_first_layer_norm_bwd(dy_k, in, mu, rs, defined_or_none(w_k),
                                                                    defined_or_none(b_k), {want_in, need_w, need_b},
                                                                    weight_offset);
      } else if (channels_first) {
        std::tie(d_in, dw) = call_channels_first_rms_norm_bwd(dy_k, in, rs, defined_or_none(w_k), {want_in, need_w},
                                                              weight_offset, eps);
      } else if (centered) {
        std::tie(d_in, dw, db) = call_layer_norm_bwd(dy_k, in, mu, rs, defined_or_none(w_k), defined_or_none(b_k),
                                                     {want_in, need_w, need_b}, defined_or_none(dh), weight_offset);
      } else {
        std::tie(d_in, dw) = call_rms_norm_bwd(dy_k, in, rs, defined_or_none(w_k), {want_in, need_w},
                                               defined_or_none(dh), weight_offset, eps);
      }
      if (need_w) dw = dw.to(w.scalar_type());
      if (need_b) db = db.to(b.scalar_type());
    } else if (dh.defined()) {  // only h is used downstream: the norm passes nothing back
      d_in = dh;
    }
    const auto as = [&](at::ScalarType dtype) { return d_in.defined() ? d_in.to(dtype) : Tensor(); };
    const Tensor dx = need_x ? as(x_dtype) : Tensor();
    // x and residual of one dtype (other than h's: a 16-bit residual added in float32) share
    // one converted gradient, as they share d_in itself when no conversion is needed.
    const Tensor dres = !need_residual ? Tensor() : (need_x && residual_dtype == x_dtype ? dx : as(residual_dtype));
    return {dx, dres, need_w ? dw : Tensor(), need_b ? db : Tensor()};
  }
};

// torch 2.14 holds graph nodes in c10::intrusive_ptr, earlier releases in std::shared_ptr.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());
template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

// Whether a call must record a graph node: grad mode on and an input that requires grad.
// Otherwise the Autograd kernels go straight to the device kernel.
bool records_graph(const Tensor& x, const OptTensor& a, const OptTensor& b, const OptTensor& c = std::nullopt) {
  if (!torch::autograd::GradMode::is_enabled()) return false;
  const auto wants = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return x.requires_grad() || wants(a) || wants(b) || wants(c);
}

// A forward op's outputs (y, h when add, mean when centered, rstd), run below autograd, and,
// when a graph is recorded, its NormBackward node with y (and h) as its differentiable outputs.
// channels_first: the channels-first ops (normalized_shape unused; no residual).
std::vector<Tensor> norm_forward(const Tensor& x, const OptTensor& residual, at::IntArrayRef normalized_shape,
                                 const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                                 OptDtype out_dtype, double weight_offset, bool centered, bool channels_first = false) {
  const bool add = residual.has_value();
  const bool graph = records_graph(x, residual, weight, bias);
  Tensor y, h, mean, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (channels_first && centered) {
      std::tie(y, mean, rstd) = call_channels_first_layer_norm_fwd(x, weight, bias, eps, weight_offset, out_dtype);
    } else if (channels_first) {
      std::tie(y, rstd) = call_channels_first_rms_norm_fwd(x, weight, eps, weight_offset, out_dtype);
    } else if (add && centered) {
      std::tie(y, h, mean, rstd) = call_add_layer_norm_fwd(x, *residual, normalized_shape, weight, bias, eps,
                                                           residual_dtype, out_dtype, weight_offset);
    } else if (add) {
      std::tie(y, h, rstd) = call_add_rms_norm_fwd(x, *residual, normalized_shape, weight, eps, residual_dtype,
                                                   out_dtype, weight_offset);
    } else if (centered) {
      std::tie(y, mean, rstd) = call_layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype, weight_offset);
    } else {
      std::tie(y, rstd) = call_rms_norm_fwd(x, normalized_shape, weight, eps, out_dtype, weight_offset);
    }
  }
  if (graph) {
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    auto node = make_node<NormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, residual.value_or(Tensor()), w, b));
    const NodePtr base = node;
    torch::autograd::set_history(y, base);
    if (add) torch::autograd::set_history(h, base);  // mean and rstd get no gradient
    node->input = torch::autograd::SavedVariable(add ? h : x, /*is_output=*/add);
    node->mean = torch::autograd::SavedVariable(mean, false);
    node->rstd = torch::autograd::SavedVariable(rstd, false);
    node->weight = torch::autograd::SavedVariable(w, false);
    node->bias = torch::autograd::SavedVariable(b, false);
    node->eps = eps;
    node->weight_offset = weight_offset;
    node->k = static_cast<int64_t>(normalized_shape.size());
    node->centered = centered;
    node->add = add;
    node->channels_first = channels_first;
    node->x_dtype = x.scalar_type();
    node->residual_dtype = add ? residual->scalar_type() : x.scalar_type();
  }
  std::vector<Tensor> outputs{y};
  if (add) outputs.push_back(h);
  if (centered) outputs.push_back(mean);
  outputs.push_back(rstd);
  return outputs;
}

Tensor3 layer_norm_fwd_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset) {
  auto o = norm_forward(x, std::nullopt, normalized_shape, weight, bias, eps, std::nullopt, out_dtype, weight_offset,
                        true);
  return {o[0], o[1], o[2]};
}

Tensor2 rms_norm_fwd_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, double eps,
                              OptDtype out_dtype, double weight_offset) {
  auto o = norm_forward(x, std::nullopt, normalized_shape, weight, std::nullopt, eps, std::nullopt, out_dtype,
                        weight_offset, false);
  return {o[0], o[1]};
}

Tensor4 add_layer_norm_fwd_autograd(const Tensor& x, const Tensor& residual, at::IntArrayRef normalized_shape,
                                    const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype,
                                    OptDtype out_dtype, double weight_offset) {
  auto o = norm_forward(x, residual, normalized_shape, weight, bias, eps, residual_dtype, out_dtype, weight_offset,
                        true);
  return {o[0], o[1], o[2], o[3]};
}

Tensor3 add_rms_norm_fwd_autograd(const Tensor& x, const Tensor& residual, at::IntArrayRef normalized_shape,
                                  const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype,
                                  double weight_offset) {
  auto o = norm_forward(x, residual, normalized_shape, weight, std::nullopt, eps, residual_dtype, out_dtype,
                        weight_offset, false);
  return {o[0], o[1], o[2]};
}

Tensor3 channels_first_layer_norm_fwd_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                               double eps, double weight_offset, OptDtype out_dtype) {
  auto o = norm_forward(x, std::nullopt, {}, weight, bias, eps, std::nullopt, out_dtype, weight_offset, true, true);
  return {o[0], o[1], o[2]};
}

Tensor2 channels_first_rms_norm_fwd_autograd(const Tensor& x, const OptTensor& weight, double eps,
                                             double weight_offset, OptDtype out_dtype) {
  auto o = norm_forward(x, std::nullopt, {}, weight, std::nullopt, eps, std::nullopt, out_dtype, weight_offset, false,
                        true);
  return {o[0], o[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, Autograd, m) {
  m.impl("channels_first_layer_norm_fwd", &channels_first_layer_norm_fwd_autograd);
  m.impl("channels_first_rms_norm_fwd", &channels_first_rms_norm_fwd_autograd);
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_autograd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_autograd);
}

}  // namespace ln_ext
