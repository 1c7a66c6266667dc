// Shared by the CPU and CUDA launchers of the fused LN-RNN cell ops: operand
// bundles, the device-independent op bodies (argument checks, allocation) and
// the kernel entry points each device provides.
//
// One "row" is one sample of one time step. B = batch, H = hidden size.
// Every io tensor has one dtype T (float32/64, float16, bfloat16); the saved
// activations (`gates`), statistics (`stats`) and per-row parameter-gradient
// contributions (`*_rows`) are acc_t: float32, or float64 for float64 T.
// Parameter gradients are the column sums of the `*_rows` outputs, taken by
// the caller (a fixed-order reduction: deterministic, no atomics).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace ln_ext {

// LN-RNN (eq. 4): h = tanh(LN(xproj + hproj; gamma, beta)), or relu(...) (nn.RNN's
// nonlinearity='relu').
struct RnnCellArgs {
  int64_t batch = 0, hidden = 0;
  double eps = 0;
  bool relu = false;
  at::Tensor xproj, hproj;            // [B, H]: W_x x_t and W_h h_{t-1}
  at::Tensor gamma, beta;             // [H]
  at::Tensor h, stats;                // fwd out: [B, H], [B, 2] (mean, rstd)
  at::Tensor dh;                      // bwd in: [B, H]
  at::Tensor da, dgamma_rows, dbeta_rows;  // bwd out: [B, H] (T), [B, H] x2 (acc_t)
};

// LN-LSTM, gate order (i, f, g, o) as nn.LSTM (g is the paper's u):
//   pre = xgates + LN(hproj; gamma_h) + bias,  c = s(f) c_prev + s(i) tanh(g),
//   h = s(o) tanh(LN(c; gamma_c, beta_c)).
// xgates is the already normalized input projection (with its own gain and
// shift); `bias` is the sum of every shift added to pre (b_h + b).
struct LstmCellArgs {
  int64_t batch = 0, hidden = 0;
  double eps = 0;
  at::Tensor xgates, hproj;           // [B, 4H]
  at::Tensor c_prev;                  // [B, H]
  at::Tensor gamma_h, bias;           // [4H]
  at::Tensor gamma_c, beta_c;         // [H]
  at::Tensor h, c;                    // fwd out: [B, H]
  at::Tensor gates;                   // fwd out: [B, 4H] acc_t: s(i), s(f), tanh(g), s(o)
  at::Tensor stats;                   // fwd out: [B, 4] acc_t: mean/rstd of hproj, of c
  at::Tensor dh, dc;                  // bwd in: [B, H]
  at::Tensor dgates, dhproj;          // bwd out: [B, 4H] d(pre), d(hproj)
  at::Tensor dc_prev;                 // bwd out: [B, H]
  at::Tensor dgamma_h_rows;           // bwd out: [B, 4H] acc_t
  at::Tensor dgamma_c_rows, dbeta_c_rows;  // bwd out: [B, H] acc_t
};

// LN-GRU, gate order (z, r, n):
//   [z, r] = s(xzr + LN(hproj[:, :2H]; gamma_h[:2H], beta_h[:2H])),
//   hn = LN(hproj[:, 2H:]; gamma_h[2H:], beta_h[2H:]),  n = tanh(xn + r hn),
//   h = (1 - z) h_prev + z n.
// xzr and xn are the already normalized input projections.
struct GruCellArgs {
  int64_t batch = 0, hidden = 0;
  double eps = 0;
  at::Tensor xzr;                     // [B, 2H]
  at::Tensor xn;                      // [B, H]
  at::Tensor hproj;                   // [B, 3H]: W_h h_{t-1}
  at::Tensor h_prev;                  // [B, H]
  at::Tensor gamma_h, beta_h;         // [3H]
  at::Tensor h;                       // fwd out: [B, H]
  at::Tensor gates;                   // fwd out: [B, 4H] acc_t: z, r, n, hn
  at::Tensor stats;                   // fwd out: [B, 4] acc_t: mean/rstd of the zr and n groups
  at::Tensor dh;                      // bwd in: [B, H]
  at::Tensor dxzr, dxn, dhproj, dh_prev;        // bwd out (T)
  at::Tensor dgamma_h_rows, dbeta_h_rows;       // bwd out: [B, 3H] acc_t
};

using RnnCellKernel = void (*)(const RnnCellArgs&);
using LstmCellKernel = void (*)(const LstmCellArgs&);

// One step of an LSTM sequence for a device's fused time loop: cell.hproj = h_prev W_h^T,
// then the cell on cell's operands (cell.batch rows).
struct LstmStep {
  at::Tensor h_prev;  // [batch, H]
  LstmCellArgs cell;
};
// A device's whole-sequence LSTM forward loop (the CPU's runs each step's GEMM and cell on
// one team of threads, rnn_cpu.cpp): runs the `count` steps `step(0)`, `step(1)`, ... in that
// order and returns true, or returns false having asked for no step where it does not
// apply, and the sequence op runs its own loop.
using LstmStepsRunner = bool (*)(int64_t count, c10::function_ref<LstmStep(int64_t)> step,
                                 const at::Tensor& weight_hh);
// One step of an LSTM sequence's backward for a device's fused loop, on the first
// cell.batch rows of `carry` (the gradient reaching h from later steps, [B, H]):
// cell.dh = dout + carry, the cell's backward, cell.dc = cell.dc_prev, carry = cell.dhproj W_h.
struct LstmBackStep {
  at::Tensor dout;  // [batch, H]: the step's output gradient
  LstmCellArgs cell;
};
// What a fused backward loop sums while each step's rows are in cache: per batch row b, the
// sum over the steps (in the order they run) of row b of the cell's dgamma_h_rows, dgates (the
// bias gradient's rows), dgamma_c_rows and dbeta_c_rows; [B, 4H], [B, 4H], [B, H], [B, H] in
// the accumulation dtype, zero on entry. The op then sums them over b: the same order on any
// thread count, and no [N, n] rows read back from memory after the loop.
struct LstmGradSums {
  at::Tensor dgamma_h, dbias, dgamma_c, dbeta_c;
};
using LstmBackStepsRunner = bool (*)(int64_t count, c10::function_ref<LstmBackStep(int64_t)> step,
                                     const at::Tensor& weight_hh, const at::Tensor& carry,
                                     const LstmGradSums& sums);
using GruCellKernel = void (*)(const GruCellArgs&);

// Device-independent op bodies (csrc/rnn.cpp): check, make contiguous,
// allocate, run `kernel` when there is at least one element.
std::tuple<at::Tensor, at::Tensor> rnn_cell_fwd_impl(
    const at::Tensor& xproj, const at::Tensor& hproj, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, bool relu, RnnCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_bwd_impl(
    const at::Tensor& dh, const at::Tensor& xproj, const at::Tensor& hproj,
    const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta, bool relu,
    RnnCellKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_impl(
    const at::Tensor& xgates, const at::Tensor& hproj, const at::Tensor& c_prev,
    const at::Tensor& gamma_h, const at::Tensor& bias, const at::Tensor& gamma_c,
    const at::Tensor& beta_c, double eps, LstmCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_bwd_impl(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& hproj,
                   const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& gates,
                   const at::Tensor& stats, const at::Tensor& gamma_h,
                   const at::Tensor& gamma_c, const at::Tensor& beta_c,
                   LstmCellKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_fwd_impl(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& hproj,
    const at::Tensor& h_prev, const at::Tensor& gamma_h, const at::Tensor& beta_h,
    double eps, GruCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_cell_bwd_impl(const at::Tensor& dh, const at::Tensor& hproj, const at::Tensor& h_prev,
                  const at::Tensor& gates, const at::Tensor& stats,
                  const at::Tensor& gamma_h, GruCellKernel kernel);

// The op functions a device registers (TORCH_LIBRARY_IMPL): the op bodies
// above bound to that device's kernels.
template <RnnCellKernel K>
std::tuple<at::Tensor, at::Tensor> rnn_cell_fwd_op(
    const at::Tensor& xproj, const at::Tensor& hproj, const at::Tensor& gamma,
    const at::Tensor& beta, double eps, bool relu) {
  return rnn_cell_fwd_impl(xproj, hproj, gamma, beta, eps, relu, K);
}
template <RnnCellKernel K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_bwd_op(
    const at::Tensor& dh, const at::Tensor& xproj, const at::Tensor& hproj,
    const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta, bool relu) {
  return rnn_cell_bwd_impl(dh, xproj, hproj, stats, gamma, beta, relu, K);
}
template <LstmCellKernel K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_op(
    const at::Tensor& xgates, const at::Tensor& hproj, const at::Tensor& c_prev,
    const at::Tensor& gamma_h, const at::Tensor& bias, const at::Tensor& gamma_c,
    const at::Tensor& beta_c, double eps) {
  return lstm_cell_fwd_impl(xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, eps, K);
}
template <LstmCellKernel K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_bwd_op(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& hproj,
                 const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& gates,
                 const at::Tensor& stats, const at::Tensor& gamma_h,
                 const at::Tensor& gamma_c, const at::Tensor& beta_c) {
  return lstm_cell_bwd_impl(dh, dc, hproj, c_prev, c, gates, stats, gamma_h, gamma_c, beta_c, K);
}
template <GruCellKernel K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_fwd_op(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& hproj,
    const at::Tensor& h_prev, const at::Tensor& gamma_h, const at::Tensor& beta_h, double eps) {
  return gru_cell_fwd_impl(xzr, xn, hproj, h_prev, gamma_h, beta_h, eps, K);
}
template <GruCellKernel K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_cell_bwd_op(const at::Tensor& dh, const at::Tensor& hproj, const at::Tensor& h_prev,
                const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h) {
  return gru_cell_bwd_impl(dh, hproj, h_prev, gates, stats, gamma_h, K);
}

// ---- sequence ops (csrc/rnn_sequence.cpp): one layer-direction over a whole
// sequence, the time loop in C++ around the device's cell kernel. Sequence
// tensors are [T, B, n] (batch_sizes undefined) or packed [N, n]
// (PackedSequence data, batch_sizes a CPU int64 [T]); states [B, H].
using OptTensorRef = c10::optional<at::Tensor>;
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_sequence_fwd_impl(
    const at::Tensor& xproj, const at::Tensor& weight_hh, const at::Tensor& h0,
    const at::Tensor& gamma, const at::Tensor& beta, const OptTensorRef& batch_sizes,
    bool reverse, double eps, bool relu, bool save, RnnCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_sequence_bwd_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& xproj,
    const at::Tensor& weight_hh, const at::Tensor& h0, const at::Tensor& output,
    const at::Tensor& hproj, const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
    const OptTensorRef& batch_sizes, bool reverse, bool relu, RnnCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_sequence_fwd_impl(const at::Tensor& xgates, const at::Tensor& weight_hh, const at::Tensor& h0,
                       const at::Tensor& c0, const at::Tensor& gamma_h, const at::Tensor& bias,
                       const at::Tensor& gamma_c, const at::Tensor& beta_c,
                       const OptTensorRef& batch_sizes, bool reverse, double eps, bool save,
                       const OptTensorRef& weight_hr, LstmCellKernel kernel,
                       LstmStepsRunner run_steps = nullptr);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_sequence_bwd_impl(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                       const at::Tensor& weight_hh, const at::Tensor& h0, const at::Tensor& c0,
                       const at::Tensor& output, const at::Tensor& hproj, const at::Tensor& cs,
                       const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h,
                       const at::Tensor& gamma_c, const at::Tensor& beta_c,
                       const OptTensorRef& batch_sizes, bool reverse, const OptTensorRef& weight_hr,
                       const OptTensorRef& h_full, LstmCellKernel kernel,
                       LstmBackStepsRunner run_back_steps = nullptr);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_fwd_impl(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& weight_hh, const at::Tensor& h0,
    const at::Tensor& gamma_h, const at::Tensor& beta_h, const OptTensorRef& batch_sizes,
    bool reverse, double eps, bool save, GruCellKernel kernel);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_bwd_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& weight_hh,
    const at::Tensor& h0, const at::Tensor& output, const at::Tensor& hproj, const at::Tensor& gates,
    const at::Tensor& stats, const at::Tensor& gamma_h, const OptTensorRef& batch_sizes,
    bool reverse, GruCellKernel kernel);

// input_projection (x @ weight^T over x's last dim): its argument checks, shared by every
// device's kernel; the kernel of devices without one of their own (at::linear).
void check_input_projection(const at::Tensor& x, const at::Tensor& weight);
at::Tensor input_projection_by_linear(const at::Tensor& x, const at::Tensor& weight);

// The sequence ops bound to one device's cell kernels (fwd, bwd), for
// TORCH_LIBRARY_IMPL: `Fwd` and `Bwd` are that device's cell kernel entry points.
template <RnnCellKernel Fwd, RnnCellKernel Bwd>
struct RnnSequenceOps {
  static auto fwd(const at::Tensor& xproj, const at::Tensor& weight_hh, const at::Tensor& h0,
                  const at::Tensor& gamma, const at::Tensor& beta, const OptTensorRef& batch_sizes,
                  bool reverse, double eps, bool relu, bool save) {
    return rnn_sequence_fwd_impl(xproj, weight_hh, h0, gamma, beta, batch_sizes, reverse, eps, relu, save, Fwd);
  }
  static auto bwd(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& xproj,
                  const at::Tensor& weight_hh, const at::Tensor& h0, const at::Tensor& output,
                  const at::Tensor& hproj, const at::Tensor& stats, const at::Tensor& gamma,
                  const at::Tensor& beta, const OptTensorRef& batch_sizes, bool reverse, bool relu) {
    return rnn_sequence_bwd_impl(grad_output, grad_h_n, xproj, weight_hh, h0, output, hproj, stats, gamma,
                                 beta, batch_sizes, reverse, relu, Bwd);
  }
};
template <LstmCellKernel Fwd, LstmCellKernel Bwd, LstmStepsRunner RunSteps = nullptr,
          LstmBackStepsRunner RunBackSteps = nullptr>
struct LstmSequenceOps {
  static auto fwd(const at::Tensor& xgates, const at::Tensor& weight_hh, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& gamma_h, const at::Tensor& bias,
                  const at::Tensor& gamma_c, const at::Tensor& beta_c, const OptTensorRef& batch_sizes,
                  bool reverse, double eps, bool save, const OptTensorRef& weight_hr) {
    return lstm_sequence_fwd_impl(xgates, weight_hh, h0, c0, gamma_h, bias, gamma_c, beta_c, batch_sizes,
                                  reverse, eps, save, weight_hr, Fwd, RunSteps);
  }
  static auto bwd(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                  const at::Tensor& weight_hh, const at::Tensor& h0, const at::Tensor& c0,
                  const at::Tensor& output, const at::Tensor& hproj, const at::Tensor& cs,
                  const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h,
                  const at::Tensor& gamma_c, const at::Tensor& beta_c, const OptTensorRef& batch_sizes,
                  bool reverse, const OptTensorRef& weight_hr, const OptTensorRef& h_full) {
    return lstm_sequence_bwd_impl(grad_output, grad_h_n, grad_c_n, weight_hh, h0, c0, output, hproj, cs,
                                  gates, stats, gamma_h, gamma_c, beta_c, batch_sizes, reverse, weight_hr, h_full,
                                  Bwd, RunBackSteps);
  }
};
template <GruCellKernel Fwd, GruCellKernel Bwd>
struct GruSequenceOps {
  static auto fwd(const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& weight_hh,
                  const at::Tensor& h0, const at::Tensor& gamma_h, const at::Tensor& beta_h,
                  const OptTensorRef& batch_sizes, bool reverse, double eps, bool save) {
    return gru_sequence_fwd_impl(xzr, xn, weight_hh, h0, gamma_h, beta_h, batch_sizes, reverse, eps, save, Fwd);
  }
  static auto bwd(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& weight_hh,
                  const at::Tensor& h0, const at::Tensor& output, const at::Tensor& hproj,
                  const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h,
                  const OptTensorRef& batch_sizes, bool reverse) {
    return gru_sequence_bwd_impl(grad_output, grad_h_n, weight_hh, h0, output, hproj, gates, stats, gamma_h,
                                 batch_sizes, reverse, Bwd);
  }
};

// Kernel entry points.
void rnn_cell_fwd_cpu_kernel(const RnnCellArgs& a);
void rnn_cell_bwd_cpu_kernel(const RnnCellArgs& a);
void lstm_cell_fwd_cpu_kernel(const LstmCellArgs& a);
void lstm_cell_bwd_cpu_kernel(const LstmCellArgs& a);
void gru_cell_fwd_cpu_kernel(const GruCellArgs& a);
void gru_cell_bwd_cpu_kernel(const GruCellArgs& a);
#ifdef LN_EXT_WITH_CUDA
void rnn_cell_fwd_cuda_kernel(const RnnCellArgs& a);
void rnn_cell_bwd_cuda_kernel(const RnnCellArgs& a);
void lstm_cell_fwd_cuda_kernel(const LstmCellArgs& a);
void lstm_cell_bwd_cuda_kernel(const LstmCellArgs& a);
void gru_cell_fwd_cuda_kernel(const GruCellArgs& a);
void gru_cell_bwd_cuda_kernel(const GruCellArgs& a);
#endif

}  // namespace ln_ext
