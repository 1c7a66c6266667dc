// Every op schema of ln_ext, in one place, and the Python module ln_ext._C.
// Device kernels register themselves in cpu/ and cuda/ (TORCH_LIBRARY_IMPL).
#include <torch/extension.h>
#include <torch/library.h>

#include <map>
#include <string>

#include "layer_norm.h"
#include "cpu/rnn_cells_cpu.h"
#include "cpu/row_kernels.h"
#ifdef LN_EXT_WITH_CUDA
#include "cuda/cluster_support.h"
#endif

TORCH_LIBRARY(ln_ext, m) {
  // ---- the norm family (csrc/layer_norm.h) ----
  // Every op of the family takes weight_offset (default 0): the gain is weight_offset +
  // weight (a zero-centered gain, Gemma's 1 + w), read by the kernels as a scalar; the
  // gradient goes to weight. A nonzero offset needs a weight.
  // LayerNorm over the trailing dims named by normalized_shape (DESIGN §2).
  // mean/rstd: x.shape[:-len(normalized_shape)], float32 (float64 for double x).
  // out_dtype: y's dtype; float32 is accepted for float16/bfloat16 x (autocast).
  m.def(
      "layer_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, ScalarType? out_dtype=None, float weight_offset=0.) -> (Tensor y, Tensor mean, Tensor rstd)");
  // Gradients of layer_norm_fwd. Outputs not asked for in output_mask, or whose
  // parameter is None, come back as empty [0] tensors. grad_h (x's shape and dtype):
  // a gradient of the norm's input from elsewhere, added to dx (add + norm, where x is
  // h = x + residual, which the forward also returned).
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, bool[3] output_mask, Tensor? grad_h=None, float weight_offset=0.) -> (Tensor dx, Tensor dweight, "
      "Tensor dbias)");

  // RMSNorm over the trailing dims: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps)
  // (no mean, no bias); rstd as layer_norm_fwd's. Same kernels, not centered. The backward's
  // eps (the forward's): with one normalized element, dx = dy * gain * eps * rstd^3 exactly,
  // where the general rstd * g * (1 - xhat^2) cancels; without it, that general form.
  m.def(
      "rms_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, float eps, "
      "ScalarType? out_dtype=None, float weight_offset=0.) -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor x, Tensor rstd, Tensor? weight, bool[2] output_mask, "
      "Tensor? grad_h=None, float weight_offset=0., float? eps=None) -> (Tensor dx, Tensor dweight)");

  // Add + norm in one pass: h = x + residual in the residual stream's dtype (residual_dtype,
  // default the residual's: x's or, beside a 16-bit x, float32), y = norm(h) in x's dtype
  // (or out_dtype, as above). The backward is the norm's, on h, with the gradient of h
  // from outside as grad_h.
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps, ScalarType? residual_dtype=None, ScalarType? out_dtype=None, float weight_offset=0.) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "add_rms_norm_fwd(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight, "
      "float eps, ScalarType? residual_dtype=None, ScalarType? out_dtype=None, float weight_offset=0.) "
      "-> (Tensor y, Tensor h, Tensor rstd)");

  // Channels-first LayerNorm / RMSNorm over dim 1 of x: [B, C, *spatial] (ConvNeXt's and
  // timm's LayerNorm2d), NCHW read and written in place. weight/bias: [C]; mean/rstd: x's shape
  // without dim 1; dtypes, out_dtype and weight_offset as the ops above.
  m.def(
      "channels_first_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
      "float weight_offset=0., ScalarType? out_dtype=None) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "channels_first_rms_norm_fwd(Tensor x, Tensor? weight, float eps, float weight_offset=0., "
      "ScalarType? out_dtype=None) -> (Tensor y, Tensor rstd)");
  m.def(
      "channels_first_layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, bool[3] output_mask, float weight_offset=0.) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "channels_first_rms_norm_bwd(Tensor dy, Tensor x, Tensor rstd, Tensor? weight, bool[2] output_mask, "
      "float weight_offset=0., float? eps=None) -> (Tensor dx, Tensor dweight)");

  // ---- LN-RNN cells (issue 4; csrc/rnn.h has the equations and shapes) ----
  // One fused element-wise step each: everything but the W_h h GEMM. B = batch,
  // H = hidden; io tensors share hproj's dtype and device; gates, stats and the
  // *_rows outputs are float32 (float64 for double io). Parameter gradients are
  // the column sums of the *_rows outputs (and of dgates for the LSTM bias).
  m.def(
      "rnn_cell_fwd(Tensor xproj, Tensor hproj, Tensor gamma, Tensor beta, float eps, bool relu=False) "
      "-> (Tensor h, Tensor stats)");
  m.def(
      "rnn_cell_bwd(Tensor dh, Tensor xproj, Tensor hproj, Tensor stats, Tensor gamma, "
      "Tensor beta, bool relu=False) -> (Tensor da, Tensor dgamma_rows, Tensor dbeta_rows)");
  m.def(
      "lstm_cell_fwd(Tensor xgates, Tensor hproj, Tensor c_prev, Tensor gamma_h, Tensor bias, "
      "Tensor gamma_c, Tensor beta_c, float eps) -> (Tensor h, Tensor c, Tensor gates, Tensor stats)");
  m.def(
      "lstm_cell_bwd(Tensor dh, Tensor dc, Tensor hproj, Tensor c_prev, Tensor c, Tensor gates, "
      "Tensor stats, Tensor gamma_h, Tensor gamma_c, Tensor beta_c) -> (Tensor dgates, "
      "Tensor dhproj, Tensor dc_prev, Tensor dgamma_h_rows, Tensor dgamma_c_rows, "
      "Tensor dbeta_c_rows)");
  m.def(
      "gru_cell_fwd(Tensor xzr, Tensor xn, Tensor hproj, Tensor h_prev, Tensor gamma_h, "
      "Tensor beta_h, float eps) -> (Tensor h, Tensor gates, Tensor stats)");
  m.def(
      "gru_cell_bwd(Tensor dh, Tensor hproj, Tensor h_prev, Tensor gates, Tensor stats, "
      "Tensor gamma_h) -> (Tensor dxzr, Tensor dxn, Tensor dhproj, Tensor dh_prev, "
      "Tensor dgamma_h_rows, Tensor dbeta_h_rows)");
  // ---- end LN-RNN cells ----

  // ---- LN-RNN sequences (issue 13; csrc/rnn_sequence.cpp): one layer-direction over a
  // whole sequence, the time loop in C++. Sequence tensors are [T, B, n], or packed [N, n]
  // with batch_sizes (a PackedSequence's, int64 on the CPU); states [B, H]; io tensors
  // share weight_hh's dtype and device. hproj, cs, gates, stats: what the backward reads.
  // The *_bwd gradients of weight_hh and of every LN gain/shift and bias are summed over
  // all rows in a fixed order. save=False (inference: nothing will run the backward): the
  // tensors only the backward reads (hproj, cs, gates, stats) are neither kept per step
  // nor returned (empty [0] tensors). LSTM with weight_hr [P, H] (nn.LSTM's proj_size P):
  // h = weight_hr (the cell's h, h_full), h0, output and the h gradients have P features
  // and weight_hh is [4H, P]; h_full is saved for the backward, which returns d_weight_hr
  // (empty without a projection).
  m.def(
      "rnn_sequence_fwd(Tensor xproj, Tensor weight_hh, Tensor h0, Tensor gamma, Tensor beta, "
      "Tensor? batch_sizes, bool reverse, float eps, bool relu=False, bool save=True) -> (Tensor output, "
      "Tensor h_n, Tensor hproj, Tensor stats)");
  m.def(
      "rnn_sequence_bwd(Tensor grad_output, Tensor grad_h_n, Tensor xproj, Tensor weight_hh, Tensor h0, "
      "Tensor output, Tensor hproj, Tensor stats, Tensor gamma, Tensor beta, Tensor? batch_sizes, "
      "bool reverse, bool relu=False) -> (Tensor d_xproj, Tensor d_weight_hh, Tensor d_h0, Tensor d_gamma, "
      "Tensor d_beta)");
  m.def(
      "lstm_sequence_fwd(Tensor xgates, Tensor weight_hh, Tensor h0, Tensor c0, Tensor gamma_h, "
      "Tensor bias, Tensor gamma_c, Tensor beta_c, Tensor? batch_sizes, bool reverse, float eps, "
      "bool save=True, Tensor? weight_hr=None) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor hproj, "
      "Tensor cs, Tensor gates, Tensor stats, Tensor h_full)");
  m.def(
      "lstm_sequence_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor weight_hh, "
      "Tensor h0, Tensor c0, Tensor output, Tensor hproj, Tensor cs, Tensor gates, Tensor stats, "
      "Tensor gamma_h, Tensor gamma_c, Tensor beta_c, Tensor? batch_sizes, bool reverse, "
      "Tensor? weight_hr=None, Tensor? h_full=None) -> (Tensor d_xgates, Tensor d_weight_hh, Tensor d_h0, "
      "Tensor d_c0, Tensor d_gamma_h, Tensor d_bias, Tensor d_gamma_c, Tensor d_beta_c, Tensor d_weight_hr)");
  m.def(
      "gru_sequence_fwd(Tensor xzr, Tensor xn, Tensor weight_hh, Tensor h0, Tensor gamma_h, "
      "Tensor beta_h, Tensor? batch_sizes, bool reverse, float eps, bool save=True) -> (Tensor output, "
      "Tensor h_n, Tensor hproj, Tensor gates, Tensor stats)");
  m.def(
      "gru_sequence_bwd(Tensor grad_output, Tensor grad_h_n, Tensor weight_hh, Tensor h0, Tensor output, "
      "Tensor hproj, Tensor gates, Tensor stats, Tensor gamma_h, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor d_xzr, Tensor d_xn, Tensor d_weight_hh, Tensor d_h0, Tensor d_gamma_h, Tensor d_beta_h)");
  // input @ weight^T over input's last dim (F.linear without bias): the LN-RNN projections of
  // an inference call, on the CPU in float32 by the fused loops' step GEMM (rnn_cpu.cpp);
  // every other dtype and device is at::linear's.
  m.def("input_projection(Tensor input, Tensor weight) -> Tensor");
  // ---- end LN-RNN sequences ----
}

namespace {
bool has_cuda_kernels() {
#ifdef LN_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "ln_ext C++/CUDA ops; the ops themselves live in torch.ops.ln_ext";
  module.def("has_cuda_kernels", &has_cuda_kernels,
             "Whether this build of ln_ext holds the CUDA kernels.");
  module.def(
      "cpu_kernel_isas",
      [] {
        return std::map<std::string, std::string>{{"norm_rows", ln_ext::cpu::row_kernels().isa},
                                                  {"rnn_cells", ln_ext::cpu::cell_kernels().isa}};
      },
      "The instruction set each CPU kernel family was picked for on this CPU (generic, avx2, "
      "avx512); LN_EXT_CPU_ISA=generic or avx2 caps it.");
  // torch.ops.ln_ext.layer_norm_fwd, minus the Python op-call overhead (~3 us a call,
  // as much as a small LayerNorm's kernel): the same dispatcher call, made from C++.
  using ln_ext::OptDtype;
  using ln_ext::OptTensor;
  module.def(
      "layer_norm",
      [](const at::Tensor& x, std::vector<int64_t> normalized_shape, const OptTensor& weight,
         const OptTensor& bias, double eps, OptDtype out_dtype, double weight_offset) {
        return std::get<0>(
            ln_ext::call_layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype, weight_offset));
      },
      "y of torch.ops.ln_ext.layer_norm_fwd (eager fast path of ln_ext.layer_norm)");
  module.def(
      "rms_norm",
      [](const at::Tensor& x, std::vector<int64_t> normalized_shape, const OptTensor& weight, double eps,
         OptDtype out_dtype, double weight_offset) {
        return std::get<0>(ln_ext::call_rms_norm_fwd(x, normalized_shape, weight, eps, out_dtype, weight_offset));
      },
      "y of torch.ops.ln_ext.rms_norm_fwd (eager fast path of ln_ext.rms_norm)");
  module.def(
      "add_layer_norm",
      [](const at::Tensor& x, const at::Tensor& residual, std::vector<int64_t> normalized_shape,
         const OptTensor& weight, const OptTensor& bias, double eps, OptDtype residual_dtype, OptDtype out_dtype,
         double weight_offset) {
        auto [y, h, mean, rstd] = ln_ext::call_add_layer_norm_fwd(x, residual, normalized_shape, weight, bias, eps,
                                                                  residual_dtype, out_dtype, weight_offset);
        return std::make_tuple(y, h);
      },
      "(y, h) of torch.ops.ln_ext.add_layer_norm_fwd (eager fast path of ln_ext.add_layer_norm)");
  module.def(
      "add_rms_norm",
      [](const at::Tensor& x, const at::Tensor& residual, std::vector<int64_t> normalized_shape,
         const OptTensor& weight, double eps, OptDtype residual_dtype, OptDtype out_dtype, double weight_offset) {
        auto [y, h, rstd] = ln_ext::call_add_rms_norm_fwd(x, residual, normalized_shape, weight, eps, residual_dtype,
                                                          out_dtype, weight_offset);
        return std::make_tuple(y, h);
      },
      "(y, h) of torch.ops.ln_ext.add_rms_norm_fwd (eager fast path of ln_ext.add_rms_norm)");
  module.def(
      "layer_norm_channels_first",
      [](const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, double weight_offset,
         OptDtype out_dtype) {
        return std::get<0>(ln_ext::call_channels_first_layer_norm_fwd(x, weight, bias, eps, weight_offset, out_dtype));
      },
      "y of torch.ops.ln_ext.channels_first_layer_norm_fwd (eager fast path)");
  module.def(
      "rms_norm_channels_first",
      [](const at::Tensor& x, const OptTensor& weight, double eps, double weight_offset, OptDtype out_dtype) {
        return std::get<0>(ln_ext::call_channels_first_rms_norm_fwd(x, weight, eps, weight_offset, out_dtype));
      },
      "y of torch.ops.ln_ext.channels_first_rms_norm_fwd (eager fast path)");
#ifdef LN_EXT_WITH_CUDA
  // For tests/test_cuda_launch_host.py: the launchers' decision, testable without a GPU.
  module.def("_kernel_has_cluster_code", &ln_ext::cuda_launch::kernel_has_cluster_code,
             "Whether a kernel with these cudaFuncAttributes ptxVersion and binaryVersion may "
             "run the thread-block cluster kernels.");
#endif
}
