// Device-independent bodies of the LN-RNN cell ops: every argument check lives
// here so that the CPU and CUDA ops reject bad input identically.
#include "rnn.h"
#include "rnn_checks.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>


namespace ln_ext {
namespace {

// hproj: [B, gates * H]; returns H.
int64_t hidden_from_hproj(const char* op, const at::Tensor& hproj, int64_t gates) {
  TORCH_CHECK(hproj.dim() == 2 && hproj.size(1) % gates == 0, op,
              ": hproj must be [batch, ", gates, " * hidden], got shape ", hproj.sizes());
  return hproj.size(1) / gates;
}

at::Tensor empty_io(const at::Tensor& like, int64_t b, int64_t n) {
  return at::empty({b, n}, like.options());
}
at::Tensor empty_acc(const at::Tensor& like, int64_t b, int64_t n) {
  return at::empty({b, n}, like.options().dtype(acc_dtype(like.scalar_type())));
}

bool has_work(int64_t batch, int64_t hidden) { return batch > 0 && hidden > 0; }

// Forward ops: run the kernel, or give the statistics of empty rows a value
// (only then, so a step costs no extra launch).
template <class Args, class Kernel>
void run_fwd(Args& a, Kernel kernel) {
  if (has_work(a.batch, a.hidden)) {
    kernel(a);
  } else {
    a.stats.zero_();
  }
}

}  // namespace

// ---------------------------------------------------------------- LN-RNN

std::tuple<at::Tensor, at::Tensor> rnn_cell_fwd_impl(
    const at::Tensor& xproj, const at::Tensor& hproj, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, bool relu, RnnCellKernel kernel) {
  const char* op = "ln_ext.rnn_cell_fwd";
  const Checker ck(op, hproj, "hproj");
  RnnCellArgs a;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 1);
  a.eps = eps;
  a.relu = relu;
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, H});
  a.xproj = ck.io(xproj, "xproj", {B, H});
  a.gamma = ck.io(gamma, "gamma", {H});
  a.beta = ck.io(beta, "beta", {H});
  a.h = empty_io(hproj, B, H);
  a.stats = empty_acc(hproj, B, 2);
  run_fwd(a, kernel);
  return {a.h, a.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_bwd_impl(
    const at::Tensor& dh, const at::Tensor& xproj, const at::Tensor& hproj,
    const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta, bool relu,
    RnnCellKernel kernel) {
  const char* op = "ln_ext.rnn_cell_bwd";
  const Checker ck(op, hproj, "hproj");
  RnnCellArgs a;
  a.relu = relu;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 1);
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, H});
  a.dh = ck.io(dh, "dh", {B, H});
  a.xproj = ck.io(xproj, "xproj", {B, H});
  a.stats = ck.acc(stats, "stats", {B, 2});
  a.gamma = ck.io(gamma, "gamma", {H});
  a.beta = ck.io(beta, "beta", {H});
  a.da = empty_io(hproj, B, H);
  a.dgamma_rows = empty_acc(hproj, B, H);
  a.dbeta_rows = empty_acc(hproj, B, H);
  if (has_work(B, H)) kernel(a);
  return {a.da, a.dgamma_rows, a.dbeta_rows};
}

// ---------------------------------------------------------------- LN-LSTM

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_impl(
    const at::Tensor& xgates, const at::Tensor& hproj, const at::Tensor& c_prev,
    const at::Tensor& gamma_h, const at::Tensor& bias, const at::Tensor& gamma_c,
    const at::Tensor& beta_c, double eps, LstmCellKernel kernel) {
  const char* op = "ln_ext.lstm_cell_fwd";
  const Checker ck(op, hproj, "hproj");
  LstmCellArgs a;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 4);
  a.eps = eps;
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, 4 * H});
  a.xgates = ck.io(xgates, "xgates", {B, 4 * H});
  a.c_prev = ck.io(c_prev, "c_prev", {B, H});
  a.gamma_h = ck.io(gamma_h, "gamma_h", {4 * H});
  a.bias = ck.io(bias, "bias", {4 * H});
  a.gamma_c = ck.io(gamma_c, "gamma_c", {H});
  a.beta_c = ck.io(beta_c, "beta_c", {H});
  a.h = empty_io(hproj, B, H);
  a.c = empty_io(hproj, B, H);
  a.gates = empty_acc(hproj, B, 4 * H);
  a.stats = empty_acc(hproj, B, 4);
  run_fwd(a, kernel);
  return {a.h, a.c, a.gates, a.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_bwd_impl(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& hproj,
                   const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& gates,
                   const at::Tensor& stats, const at::Tensor& gamma_h,
                   const at::Tensor& gamma_c, const at::Tensor& beta_c,
                   LstmCellKernel kernel) {
  const char* op = "ln_ext.lstm_cell_bwd";
  const Checker ck(op, hproj, "hproj");
  LstmCellArgs a;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 4);
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, 4 * H});
  a.dh = ck.io(dh, "dh", {B, H});
  a.dc = ck.io(dc, "dc", {B, H});
  a.c_prev = ck.io(c_prev, "c_prev", {B, H});
  a.c = ck.io(c, "c", {B, H});
  a.gates = ck.acc(gates, "gates", {B, 4 * H});
  a.stats = ck.acc(stats, "stats", {B, 4});
  a.gamma_h = ck.io(gamma_h, "gamma_h", {4 * H});
  a.gamma_c = ck.io(gamma_c, "gamma_c", {H});
  a.beta_c = ck.io(beta_c, "beta_c", {H});
  a.dgates = empty_io(hproj, B, 4 * H);
  a.dhproj = empty_io(hproj, B, 4 * H);
  a.dc_prev = empty_io(hproj, B, H);
  a.dgamma_h_rows = empty_acc(hproj, B, 4 * H);
  a.dgamma_c_rows = empty_acc(hproj, B, H);
  a.dbeta_c_rows = empty_acc(hproj, B, H);
  if (has_work(B, H)) kernel(a);
  return {a.dgates, a.dhproj, a.dc_prev, a.dgamma_h_rows, a.dgamma_c_rows, a.dbeta_c_rows};
}

// ---------------------------------------------------------------- LN-GRU

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_fwd_impl(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& hproj,
    const at::Tensor& h_prev, const at::Tensor& gamma_h, const at::Tensor& beta_h,
    double eps, GruCellKernel kernel) {
  const char* op = "ln_ext.gru_cell_fwd";
  const Checker ck(op, hproj, "hproj");
  GruCellArgs a;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 3);
  a.eps = eps;
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, 3 * H});
  a.xzr = ck.io(xzr, "xzr", {B, 2 * H});
  a.xn = ck.io(xn, "xn", {B, H});
  a.h_prev = ck.io(h_prev, "h_prev", {B, H});
  a.gamma_h = ck.io(gamma_h, "gamma_h", {3 * H});
  a.beta_h = ck.io(beta_h, "beta_h", {3 * H});
  a.h = empty_io(hproj, B, H);
  a.gates = empty_acc(hproj, B, 4 * H);
  a.stats = empty_acc(hproj, B, 4);
  run_fwd(a, kernel);
  return {a.h, a.gates, a.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_cell_bwd_impl(const at::Tensor& dh, const at::Tensor& hproj, const at::Tensor& h_prev,
                  const at::Tensor& gates, const at::Tensor& stats,
                  const at::Tensor& gamma_h, GruCellKernel kernel) {
  const char* op = "ln_ext.gru_cell_bwd";
  const Checker ck(op, hproj, "hproj");
  GruCellArgs a;
  a.batch = hproj.size(0);
  a.hidden = hidden_from_hproj(op, hproj, 3);
  const int64_t B = a.batch, H = a.hidden;
  a.hproj = ck.io(hproj, "hproj", {B, 3 * H});
  a.dh = ck.io(dh, "dh", {B, H});
  a.h_prev = ck.io(h_prev, "h_prev", {B, H});
  a.gates = ck.acc(gates, "gates", {B, 4 * H});
  a.stats = ck.acc(stats, "stats", {B, 4});
  a.gamma_h = ck.io(gamma_h, "gamma_h", {3 * H});
  a.dxzr = empty_io(hproj, B, 2 * H);
  a.dxn = empty_io(hproj, B, H);
  a.dhproj = empty_io(hproj, B, 3 * H);
  a.dh_prev = empty_io(hproj, B, H);
  a.dgamma_h_rows = empty_acc(hproj, B, 3 * H);
  a.dbeta_h_rows = empty_acc(hproj, B, 3 * H);
  if (has_work(B, H)) kernel(a);
  return {a.dxzr, a.dxn, a.dhproj, a.dh_prev, a.dgamma_h_rows, a.dbeta_h_rows};
}

// ---------------------------------------------------------------- input projection

void check_input_projection(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "ln_ext.input_projection";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": input's last dim must be weight's in_features ",
              weight.size(1), ", got shape ", x.sizes());
  TORCH_CHECK(x.device() == weight.device(), op, ": weight is on ", weight.device(), " but input is on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": input must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": input is ", x.scalar_type(), " but weight is ",
              weight.scalar_type());
}

at::Tensor input_projection_by_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_input_projection(x, weight);
  return at::linear(x, weight);
}

namespace {

const auto& input_projection_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ln_ext::input_projection", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// y = x @ weight^T; dx = dy @ weight (the same op, weight^T as its weight: on the CPU the
// step GEMM's tiles again), dweight = dy^T x (ATen's mm). Through the dispatcher, so a
// backward with create_graph=True records these ops in turn.
struct InputProjection : public torch::autograd::Function<InputProjection> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    ctx->save_for_backward({x, weight});
    return input_projection_op().call(x, weight);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &dy = grads[0];
    at::Tensor dx, dweight;
    if (ctx->needs_input_grad(0)) dx = input_projection_op().call(dy, weight.t());
    if (ctx->needs_input_grad(1)) {
      dweight = dy.reshape({-1, weight.size(0)}).t().mm(x.reshape({-1, weight.size(1)}));
    }
    return {dx, dweight};
  }
};

// With a graph to record, the InputProjection node; with a forward-mode tangent, at::linear
// (whose forward derivative is ATen's); else straight to the device kernel.
at::Tensor input_projection_autograd(const at::Tensor& x, const at::Tensor& weight) {
  if (x._fw_grad(/*level=*/0).defined() || weight._fw_grad(/*level=*/0).defined()) {
    check_input_projection(x, weight);
    return at::linear(x, weight);
  }
  if (torch::autograd::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())) {
    return InputProjection::apply(x, weight);  // its forward's device kernel checks the arguments
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return input_projection_op().call(x, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, Autograd, m) { m.impl("input_projection", &input_projection_autograd); }

}  // namespace ln_ext
