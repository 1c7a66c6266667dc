// One LN-RNN layer-direction over a whole sequence (issue 13): the time loop in
// C++, device-independent. Per step one GEMM written into preallocated W_h h
// storage (at::mm_out: BLAS on the CPU, cuBLAS on CUDA) and the fused cell kernel
// of the device (rnn.h); backward through time per step the fused backward cell
// and one GEMM for the gradient reaching h_{t-1}; after the loop the weight_hh
// gradient as one GEMM over all rows and every LN / bias gradient as one
// fixed-order column sum. Nothing in either loop allocates or syncs, so a
// layer's forward and backward can be captured in a CUDA graph. A device may run an
// LSTM's loops itself (LstmStepsRunner, LstmBackStepsRunner: the CPU's float32 loops,
// one thread team with its own step GEMM, rnn_cpu.cpp); this file still builds every
// step's operands for it.
//
// Row layout: every per-step tensor is [N, n] rows, step t owning rows
// [offset[t], offset[t] + size[t]); unpacked input [T, B, n] is N = T * B rows of
// B per step, packed input (batch_sizes) is PackedSequence's data layout, where a
// step holds the first size[t] sequences (those still running).
#include "rnn.h"
#include "rnn_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

namespace ln_ext {
namespace {

// The steps of one call and the order they run in.
struct Steps {
  std::vector<int64_t> size, offset;
  bool reverse = false;

  int64_t count() const { return static_cast<int64_t>(size.size()); }
  // The k-th step run: forwards 0..T-1, in reverse T-1..0.
  int64_t nth(int64_t k) const { return reverse ? count() - 1 - k : k; }
  // The step run before step t, or -1 for the first one.
  int64_t before(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return p < 0 || p >= count() ? -1 : p;
  }
};

// xs: [T, B, n] (batch_sizes undefined) or packed [N, n]; batch = h0's rows.
Steps make_steps(const char* op, const char* xs_name, const at::Tensor& xs,
                 const c10::optional<at::Tensor>& batch_sizes, int64_t batch, bool reverse) {
  Steps s;
  s.reverse = reverse;
  if (!batch_sizes.has_value()) {
    TORCH_CHECK(xs.dim() == 3, op, ": ", xs_name, " must be [seq_len, batch, features] without "
                "batch_sizes, got shape ", xs.sizes());
    TORCH_CHECK(xs.size(1) == batch, op, ": ", xs_name, " has batch ", xs.size(1),
                " but h0 has ", batch, " rows");
    s.size.assign(xs.size(0), batch);
  } else {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1, op,
                ": batch_sizes must be a 1-D int64 tensor on the CPU (as in a PackedSequence), got ",
                bs.scalar_type(), " of shape ", bs.sizes(), " on ", bs.device());
    TORCH_CHECK(xs.dim() == 2, op, ": ", xs_name, " must be packed [rows, features] with "
                "batch_sizes, got shape ", xs.sizes());
    const at::Tensor c = bs.contiguous();
    s.size.assign(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
    for (size_t t = 0; t < s.size.size(); ++t) {
      TORCH_CHECK(s.size[t] >= 1 && s.size[t] <= (t ? s.size[t - 1] : batch), op,
                  ": batch_sizes must be positive and non-increasing, starting at h0's ", batch,
                  " rows; got ", bs);
    }
    TORCH_CHECK(s.size.empty() || s.size[0] == batch, op, ": batch_sizes[0] = ", s.size[0],
                " but h0 has ", batch, " rows");
  }
  int64_t rows = 0;
  for (int64_t n : s.size) {
    s.offset.push_back(rows);
    rows += n;
  }
  const int64_t want = batch_sizes.has_value() ? xs.size(0) : xs.size(0) * xs.size(1);
  TORCH_CHECK(rows == want, op, ": batch_sizes sum to ", rows, " but ", xs_name, " has ", want, " rows");
  return s;
}

// Rows [first, first + n) of a contiguous [N, X] tensor: what narrow(0, first, n)
// returns, built directly on the same storage. narrow() goes through the dispatcher
// (slice, as_strided and, under the autograd fallback that runs these ops, a view's
// autograd metadata): at 10-20 views per step that was ~15% of a small layer's time.
// The loops' views never leave the op, so they need none of it.
at::Tensor rows_view(const at::Tensor& all, int64_t first, int64_t n) {
  TORCH_INTERNAL_ASSERT(all.dim() == 2 && all.is_contiguous() && first >= 0 && n >= 0 &&
                        first + n <= all.size(0));
  const int64_t width = all.size(1);
  at::Tensor view =
      at::detail::make_tensor<c10::TensorImpl>(c10::Storage(all.storage()), all.key_set(), all.dtype());
  view.unsafeGetTensorImpl()->set_sizes_contiguous({n, width});
  view.unsafeGetTensorImpl()->set_storage_offset(all.storage_offset() + first * width);
  return view;
}

at::Tensor rows_of_step(const at::Tensor& all, const Steps& s, int64_t t) {
  return rows_view(all, s.offset[t], s.size[t]);
}

// Writes the state step t starts from (rows [0, size[t])) into dst: the previous
// step's rows (fewer when sequences end) and, where that step had fewer rows
// (reverse: sequences start at their own last step), the initial state's.
void copy_state_before(const Steps& s, int64_t t, const at::Tensor& steps, const at::Tensor& init,
                       const at::Tensor& dst) {
  const int64_t n = s.size[t], p = s.before(t);
  const int64_t from_prev = p < 0 ? 0 : std::min(n, s.size[p]);
  if (from_prev > 0) rows_view(dst, 0, from_prev).copy_(rows_view(steps, s.offset[p], from_prev));
  if (from_prev < n) rows_view(dst, from_prev, n - from_prev).copy_(rows_view(init, from_prev, n - from_prev));
}

// The same state as a view where it is one (always but where rows start), else
// staged in `staging` ([B, H]).
at::Tensor state_before(const Steps& s, int64_t t, const at::Tensor& steps, const at::Tensor& init,
                        const at::Tensor& staging) {
  const int64_t n = s.size[t], p = s.before(t);
  if (p < 0) return rows_view(init, 0, n);
  if (s.size[p] >= n) return rows_view(steps, s.offset[p], n);
  copy_state_before(s, t, steps, init, staging);
  return rows_view(staging, 0, n);
}

// Whether every step's state is a view of the previous step's rows or of the initial
// state (no staging copy, which must wait for the previous step): all but reverse runs
// of packed sequences whose batch grows.
bool states_are_views(const Steps& s) {
  for (int64_t t = 0; t < s.count(); ++t) {
    const int64_t p = s.before(t);
    if (p >= 0 && s.size[p] < s.size[t]) return false;
  }
  return true;
}

// The final state of every row, its own last step's: forwards rows
// [size[t+1], size[t]) end at step t; in reverse every row ends at step 0.
at::Tensor final_state(const Steps& s, const at::Tensor& steps, const at::Tensor& init) {
  at::Tensor out = at::empty_like(init);
  if (s.count() == 0) return out.copy_(init);
  for (int64_t t = 0; t < s.count(); ++t) {
    const int64_t lo = s.reverse ? (t == 0 ? 0 : s.size[t]) : (t + 1 < s.count() ? s.size[t + 1] : 0);
    const int64_t hi = s.size[t];
    if (hi > lo) rows_view(out, lo, hi - lo).copy_(rows_view(steps, s.offset[t] + lo, hi - lo));
  }
  return out;
}

// Column sums of rows [N, n] in the accumulation dtype, cast to `dtype`. On the
// CPU in a fixed order whatever the thread count (threads split columns; each
// column sums blocks of 64 rows in order, then the blocks in order); on CUDA
// ATen's reduction, whose order is fixed for a given shape and device.
at::Tensor column_sums(const at::Tensor& rows, at::ScalarType dtype) {
  const auto acc = acc_dtype(rows.scalar_type());
  if (!rows.device().is_cpu()) return rows.sum(0, false, acc).to(dtype);
  const at::Tensor r = rows.contiguous();
  const int64_t N = r.size(0), n = r.size(1);
  at::Tensor total = at::zeros({n}, r.options().dtype(acc));
  constexpr int64_t kBlock = 64;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "column_sums", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* in = r.const_data_ptr<scalar_t>();
    A* out = total.data_ptr<A>();
    at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
      std::vector<A> block(j1 - j0);
      for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
        std::fill(block.begin(), block.end(), A(0));
        for (int64_t i = b0; i < std::min(N, b0 + kBlock); ++i) {
          const scalar_t* row = in + i * n;
          for (int64_t j = j0; j < j1; ++j) block[j - j0] += A(row[j]);
        }
        for (int64_t j = j0; j < j1; ++j) out[j] += block[j - j0];
      }
    });
  });
  return total.to(dtype);
}

// W_h^T for the forward's per-step GEMM h_{t-1} W_h^T. On the CPU a contiguous copy
// (once per call): MKL's kernels for a transposed operand ran the [16, H] x [H, 4H] step
// GEMM at about half speed (2 threads, Intel Xeon: H = 128 16.8 -> 9.3 us, 256 54.8 ->
// 29.3, 512 341 -> 144), far more than the copy costs. cuBLAS takes the transpose as a flag.
at::Tensor step_gemm_weight(const at::Tensor& weight_hh) {
  return weight_hh.device().is_cpu() ? weight_hh.t().contiguous() : weight_hh.t();
}

// What every op checks: the io dtype and device (weight_hh's), shapes, H >= 1.
// hidden: H; state: the size of h, H or (LSTM with a projection) weight_hr's rows P < H;
// weight_hr: the checked projection [P, H], undefined without one.
struct Common {
  Checker ck;
  int64_t batch, hidden, state;
  at::Tensor weight_hr;
  Common(const char* op, const at::Tensor& weight_hh, const at::Tensor& h0, int64_t gates,
         const c10::optional<at::Tensor>& weight_hr = c10::nullopt)
      : ck(op, weight_hh, "weight_hh") {
    if (weight_hr.has_value()) {
      TORCH_CHECK(weight_hr->dim() == 2 && weight_hr->size(0) >= 1 && weight_hr->size(0) < weight_hr->size(1), op,
                  ": weight_hr must be [proj_size, hidden] with 1 <= proj_size < hidden, got shape ",
                  weight_hr->sizes());
    }
    const int64_t P = weight_hr.has_value() ? weight_hr->size(0) : -1;
    TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(1) >= 1 && weight_hh.size(0) % gates == 0 &&
                    weight_hh.size(1) == (P < 0 ? weight_hh.size(0) / gates : P),
                op, ": weight_hh must be [", gates, " * hidden, ", P < 0 ? "hidden" : "proj_size",
                "] with hidden >= 1, got shape ", weight_hh.sizes());
    hidden = weight_hh.size(0) / gates;
    state = weight_hh.size(1);
    if (weight_hr.has_value()) this->weight_hr = ck.io(*weight_hr, "weight_hr", {state, hidden});
    TORCH_CHECK(h0.dim() == 2, op, ": h0 must be [batch, ", P < 0 ? "hidden" : "proj_size", "], got shape ",
                h0.sizes());
    batch = h0.size(0);
  }
};

// Per-step rows that only something after the loop reads, [N, n] rows of the sequence: all of
// them when that reader exists; else one step's worth ([B, n]) that every step overwrites.
// A forward's tensors for its backward (hproj, gates, stats: an inference run keeps no
// per-step tensor but the output, and returns none), and a backward's parameter gradient
// rows (a fused loop sums them as it goes).
struct PerStepRows {
  at::Tensor rows;  // [N, n] saved, or [B, n] scratch
  bool saved;
  PerStepRows(bool save, int64_t N, int64_t B, int64_t n, const at::TensorOptions& options)
      : rows(at::empty({save ? N : B, n}, options)), saved(save) {}
  at::Tensor of_step(const Steps& s, int64_t t) const {
    return saved ? rows_of_step(rows, s, t) : rows_view(rows, 0, s.size[t]);
  }
  // The op's result: the saved rows shaped `shape`, or an empty tensor.
  at::Tensor result(at::IntArrayRef shape) const { return saved ? rows.view(shape) : rows.new_empty({0}); }
};

// [N, n] rows of a sequence tensor shaped like xs ([T, B, ...] or [N, ...]).
at::Tensor as_rows(const at::Tensor& t, int64_t n) { return t.reshape({-1, n}); }
std::vector<int64_t> like_xs(const at::Tensor& xs, int64_t n) {
  std::vector<int64_t> shape(xs.sizes().begin(), xs.sizes().end() - 1);
  shape.push_back(n);
  return shape;
}

// The gradient reaching each step's state from later steps, carried backwards
// through time: `dh` [B, H] starts as grad_h_n and ends as grad_h0 (see the
// row layout: a step overwrites the rows it ran, the others keep what the rows
// that end or start there need).
struct Carry {
  at::Tensor dh, dh_step;  // carried gradient; this step's total gradient of h
  Carry(const at::Tensor& grad_h_n) : dh(grad_h_n.clone()), dh_step(at::empty_like(grad_h_n)) {}
  // d(loss)/d(h_t) of step t's rows: its output's gradient plus the carried one.
  at::Tensor step_grad(const at::Tensor& grad_out_rows) {
    const int64_t n = grad_out_rows.size(0);
    at::Tensor out = rows_view(dh_step, 0, n);
    at::add_out(out, grad_out_rows, rows_view(dh, 0, n));
    return out;
  }
  // The gradient reaching h_{t-1} from a step's dhproj [n, G] (plus `direct`, the
  // GRU's (1 - z) path): the one GEMM per step, into the rows the step ran.
  void to_previous(const at::Tensor& dhproj, const at::Tensor& weight_hh, const at::Tensor& direct = {}) {
    at::Tensor rows = rows_view(dh, 0, dhproj.size(0));
    if (direct.defined()) {
      at::addmm_out(rows, direct, dhproj, weight_hh);
    } else {
      at::mm_out(rows, dhproj, weight_hh);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------- LN-RNN

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_sequence_fwd_impl(
    const at::Tensor& xproj, const at::Tensor& weight_hh, const at::Tensor& h0_in,
    const at::Tensor& gamma, const at::Tensor& beta, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, double eps, bool relu, bool save, RnnCellKernel kernel) {
  const char* op = "ln_ext.rnn_sequence_fwd";
  const Common c(op, weight_hh, h0_in, 1);
  const int64_t B = c.batch, H = c.hidden;
  const Steps s = make_steps(op, "xproj", xproj, batch_sizes, B, reverse);
  const at::Tensor x = as_rows(c.ck.io(xproj, "xproj", like_xs(xproj, H)), H);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, H});
  RnnCellArgs a;
  a.hidden = H;
  a.eps = eps;
  a.relu = relu;
  a.gamma = c.ck.io(gamma, "gamma", {H});
  a.beta = c.ck.io(beta, "beta", {H});
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, H}, x.options());
  const PerStepRows hproj(save, N, B, H, x.options());
  const PerStepRows stats(save, N, B, 2, x.options().dtype(acc_dtype(x.scalar_type())));
  at::Tensor staging = at::empty({B, H}, x.options());
  const at::Tensor w_t = step_gemm_weight(weight_hh);
  for (int64_t k = 0; k < s.count(); ++k) {
    const int64_t t = s.nth(k);
    a.batch = s.size[t];
    a.hproj = hproj.of_step(s, t);
    at::mm_out(a.hproj, state_before(s, t, out, h0, staging), w_t);
    a.xproj = rows_of_step(x, s, t);
    a.h = rows_of_step(out, s, t);
    a.stats = stats.of_step(s, t);
    if (a.batch > 0) kernel(a);  // an empty batch: nothing to launch
  }
  const at::Tensor h_n = final_state(s, out, h0);
  return {out.view(like_xs(xproj, H)), h_n, hproj.result(like_xs(xproj, H)), stats.result(like_xs(xproj, 2))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_sequence_bwd_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& xproj,
    const at::Tensor& weight_hh, const at::Tensor& h0_in, const at::Tensor& output,
    const at::Tensor& hproj, const at::Tensor& stats, const at::Tensor& gamma, const at::Tensor& beta,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool relu, RnnCellKernel kernel) {
  const char* op = "ln_ext.rnn_sequence_bwd";
  const Common c(op, weight_hh, h0_in, 1);
  const int64_t B = c.batch, H = c.hidden;
  const Steps s = make_steps(op, "xproj", xproj, batch_sizes, B, reverse);
  const auto seq = like_xs(xproj, H);
  const at::Tensor x = as_rows(c.ck.io(xproj, "xproj", seq), H);
  const at::Tensor dout = as_rows(c.ck.io(grad_output, "grad_output", seq), H);
  const at::Tensor out = as_rows(c.ck.io(output, "output", seq), H);
  const at::Tensor hp = as_rows(c.ck.io(hproj, "hproj", seq), H);
  const at::Tensor st = as_rows(c.ck.acc(stats, "stats", like_xs(xproj, 2)), 2);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, H});
  Carry carry(c.ck.io(grad_h_n, "grad_h_n", {B, H}));
  RnnCellArgs a;
  a.hidden = H;
  a.relu = relu;
  a.gamma = c.ck.io(gamma, "gamma", {H});
  a.beta = c.ck.io(beta, "beta", {H});
  const int64_t N = x.size(0);
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor da = at::empty({N, H}, x.options()), h_prev = at::empty({N, H}, x.options());
  at::Tensor dgamma_rows = at::empty({N, H}, acc), dbeta_rows = at::empty({N, H}, acc);
  for (int64_t k = s.count() - 1; k >= 0; --k) {
    const int64_t t = s.nth(k);
    a.batch = s.size[t];
    a.dh = carry.step_grad(rows_of_step(dout, s, t));
    a.xproj = rows_of_step(x, s, t);
    a.hproj = rows_of_step(hp, s, t);
    a.stats = rows_of_step(st, s, t);
    a.da = rows_of_step(da, s, t);
    a.dgamma_rows = rows_of_step(dgamma_rows, s, t);
    a.dbeta_rows = rows_of_step(dbeta_rows, s, t);
    if (a.batch > 0) kernel(a);  // an empty batch: nothing to launch
    copy_state_before(s, t, out, h0, rows_of_step(h_prev, s, t));
    carry.to_previous(a.da, weight_hh);
  }
  return {da.view(seq), da.t().mm(h_prev), carry.dh, column_sums(dgamma_rows, gamma.scalar_type()),
          column_sums(dbeta_rows, beta.scalar_type())};
}

// ---------------------------------------------------------------- LN-LSTM

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_sequence_fwd_impl(const at::Tensor& xgates, const at::Tensor& weight_hh, const at::Tensor& h0_in,
                       const at::Tensor& c0_in, const at::Tensor& gamma_h, const at::Tensor& bias,
                       const at::Tensor& gamma_c, const at::Tensor& beta_c,
                       const c10::optional<at::Tensor>& batch_sizes, bool reverse, double eps, bool save,
                       const c10::optional<at::Tensor>& weight_hr, LstmCellKernel kernel,
                       LstmStepsRunner run_steps) {
  const char* op = "ln_ext.lstm_sequence_fwd";
  const Common c(op, weight_hh, h0_in, 4, weight_hr);
  const int64_t B = c.batch, H = c.hidden, P = c.state;  // P: h's size (H without a projection)
  const bool projected = weight_hr.has_value();
  const Steps s = make_steps(op, "xgates", xgates, batch_sizes, B, reverse);
  const at::Tensor x = as_rows(c.ck.io(xgates, "xgates", like_xs(xgates, 4 * H)), 4 * H);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, P});
  const at::Tensor c0 = c.ck.io(c0_in, "c0", {B, H});
  LstmCellArgs a;
  a.hidden = H;
  a.eps = eps;
  a.gamma_h = c.ck.io(gamma_h, "gamma_h", {4 * H});
  a.bias = c.ck.io(bias, "bias", {4 * H});
  a.gamma_c = c.ck.io(gamma_c, "gamma_c", {H});
  a.beta_c = c.ck.io(beta_c, "beta_c", {H});
  const int64_t N = x.size(0);
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  // cs: every step's c, which the next step reads (kept as h is in `out`; not returned
  // by an inference run). With a projection the cell's h (h_full, [n, H]) is projected
  // to out's [n, P] by weight_hr, and saved for the backward.
  at::Tensor out = at::empty({N, P}, x.options()), cs = at::empty({N, H}, x.options());
  const PerStepRows hproj(save, N, B, 4 * H, x.options());
  const PerStepRows gates(save, N, B, 4 * H, acc), stats(save, N, B, 4, acc);
  const PerStepRows h_full(save && projected, N, B, projected ? H : 0, x.options());
  at::Tensor staging_h = at::empty({B, P}, x.options()), staging_c = at::empty({B, H}, x.options());
  // Step t's operands; its state staged (a copy of the previous step's rows) where rows start.
  const auto step = [&](int64_t t) {
    LstmStep st{state_before(s, t, out, h0, staging_h), a};
    LstmCellArgs& sa = st.cell;
    sa.batch = s.size[t];
    sa.hproj = hproj.of_step(s, t);
    sa.c_prev = state_before(s, t, cs, c0, staging_c);
    sa.xgates = rows_of_step(x, s, t);
    sa.h = projected ? h_full.of_step(s, t) : rows_of_step(out, s, t);
    sa.c = rows_of_step(cs, s, t);
    sa.gates = gates.of_step(s, t);
    sa.stats = stats.of_step(s, t);
    return st;
  };
  bool ran = false;
  if (run_steps != nullptr && !projected && states_are_views(s)) {
    ran = run_steps(s.count(), [&](int64_t k) { return step(s.nth(k)); }, weight_hh);
  }
  if (!ran) {
    const at::Tensor w_t = step_gemm_weight(weight_hh);
    const at::Tensor w_hr_t = projected ? step_gemm_weight(c.weight_hr) : at::Tensor();
    for (int64_t k = 0; k < s.count(); ++k) {
      const int64_t t = s.nth(k);
      LstmStep st = step(t);
      at::mm_out(st.cell.hproj, st.h_prev, w_t);
      if (st.cell.batch > 0) kernel(st.cell);  // an empty batch: nothing to launch
      if (projected) {
        at::Tensor h = rows_of_step(out, s, t);
        at::mm_out(h, st.cell.h, w_hr_t);
      }
    }
  }
  const auto seq = [&](int64_t n) { return like_xs(xgates, n); };
  return {out.view(seq(P)), final_state(s, out, h0), final_state(s, cs, c0), hproj.result(seq(4 * H)),
          save ? cs.view(seq(H)) : cs.new_empty({0}), gates.result(seq(4 * H)), stats.result(seq(4)),
          h_full.result(seq(H))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_sequence_bwd_impl(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                       const at::Tensor& weight_hh, const at::Tensor& h0_in, const at::Tensor& c0_in,
                       const at::Tensor& output, const at::Tensor& hproj, const at::Tensor& cs_in,
                       const at::Tensor& gates, const at::Tensor& stats, const at::Tensor& gamma_h,
                       const at::Tensor& gamma_c, const at::Tensor& beta_c,
                       const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                       const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h_full_in,
                       LstmCellKernel kernel, LstmBackStepsRunner run_back_steps) {
  const char* op = "ln_ext.lstm_sequence_bwd";
  const Common c(op, weight_hh, h0_in, 4, weight_hr);
  const int64_t B = c.batch, H = c.hidden, P = c.state;
  const bool projected = weight_hr.has_value();
  const Steps s = make_steps(op, "output", output, batch_sizes, B, reverse);
  const auto seq = [&](int64_t n) { return like_xs(output, n); };
  const at::Tensor dout = as_rows(c.ck.io(grad_output, "grad_output", seq(P)), P);
  const at::Tensor out = as_rows(c.ck.io(output, "output", seq(P)), P);
  TORCH_CHECK(projected == h_full_in.has_value(), op, ": h_full is given exactly when weight_hr is");
  const at::Tensor h_full = projected ? as_rows(c.ck.io(*h_full_in, "h_full", seq(H)), H) : at::Tensor();
  const at::Tensor hp = as_rows(c.ck.io(hproj, "hproj", seq(4 * H)), 4 * H);
  const at::Tensor cs = as_rows(c.ck.io(cs_in, "cs", seq(H)), H);
  const at::Tensor gt = as_rows(c.ck.acc(gates, "gates", seq(4 * H)), 4 * H);
  const at::Tensor st = as_rows(c.ck.acc(stats, "stats", seq(4)), 4);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, P});
  const at::Tensor c0 = c.ck.io(c0_in, "c0", {B, H});
  Carry carry(c.ck.io(grad_h_n, "grad_h_n", {B, P}));
  at::Tensor dc = c.ck.io(grad_c_n, "grad_c_n", {B, H}).clone();  // carried like carry.dh
  LstmCellArgs a;
  a.hidden = H;
  a.gamma_h = c.ck.io(gamma_h, "gamma_h", {4 * H});
  a.gamma_c = c.ck.io(gamma_c, "gamma_c", {H});
  a.beta_c = c.ck.io(beta_c, "beta_c", {H});
  const int64_t N = out.size(0);
  const auto io = out.options(), acc = out.options().dtype(acc_dtype(out.scalar_type()));
  at::Tensor dgates = at::empty({N, 4 * H}, io), dhproj = at::empty({N, 4 * H}, io);
  at::Tensor h_prev = at::empty({N, P}, io), dc_prev = at::empty({B, H}, io);
  // With a projection: every step's gradient of out (for weight_hr's), and of the cell's h.
  at::Tensor d_out = projected ? at::empty({N, P}, io) : at::Tensor();
  at::Tensor dh_full = projected ? at::empty({B, H}, io) : at::Tensor();
  at::Tensor staging_c = at::empty({B, H}, io);
  // The parameter gradients' rows: every step's ([N, n]) for column_sums after the loop, or,
  // for a device's fused loop, which sums each step's rows as it goes (LstmGradSums), one
  // step's worth ([B, n]) that every step overwrites.
  const bool fused = run_back_steps != nullptr && !projected && states_are_views(s);
  const auto grad_rows = [&](bool per_step) {
    return std::array<PerStepRows, 3>{PerStepRows(per_step, N, B, 4 * H, acc), PerStepRows(per_step, N, B, H, acc),
                                      PerStepRows(per_step, N, B, H, acc)};
  };
  std::array<PerStepRows, 3> grads = grad_rows(!fused);
  const PerStepRows &dgamma_h_rows = grads[0], &dgamma_c_rows = grads[1], &dbeta_c_rows = grads[2];
  // Step t's cell operands but dh (its state staged where rows start, as in the forward).
  const auto step = [&](int64_t t) {
    const int64_t n = s.size[t];
    LstmCellArgs sa = a;
    sa.batch = n;
    sa.dc = rows_view(dc, 0, n);
    sa.hproj = rows_of_step(hp, s, t);
    sa.c_prev = state_before(s, t, cs, c0, staging_c);
    sa.c = rows_of_step(cs, s, t);
    sa.gates = rows_of_step(gt, s, t);
    sa.stats = rows_of_step(st, s, t);
    sa.dgates = rows_of_step(dgates, s, t);
    sa.dhproj = rows_of_step(dhproj, s, t);
    sa.dc_prev = rows_view(dc_prev, 0, n);  // not into dc itself: the kernel reads dc in a later pass
    sa.dgamma_h_rows = dgamma_h_rows.of_step(s, t);
    sa.dgamma_c_rows = dgamma_c_rows.of_step(s, t);
    sa.dbeta_c_rows = dbeta_c_rows.of_step(s, t);
    return sa;
  };
  bool ran = false;
  const LstmGradSums sums = fused ? LstmGradSums{at::zeros({B, 4 * H}, acc), at::zeros({B, 4 * H}, acc),
                                                 at::zeros({B, H}, acc), at::zeros({B, H}, acc)}
                                  : LstmGradSums{};
  if (fused) {
    const auto back_step = [&](int64_t k) {  // the k-th step the backward runs: the last first
      const int64_t t = s.nth(s.count() - 1 - k);
      LstmBackStep st{rows_of_step(dout, s, t), step(t)};
      st.cell.dh = rows_view(carry.dh_step, 0, s.size[t]);
      return st;
    };
    ran = run_back_steps(s.count(), back_step, weight_hh, carry.dh, sums);
    if (!ran) grads = grad_rows(true);
  }
  for (int64_t k = s.count() - 1; k >= 0; --k) {
    const int64_t t = s.nth(k), n = s.size[t];
    if (!ran) {
      LstmCellArgs sa = step(t);
      sa.dh = carry.step_grad(rows_of_step(dout, s, t));
      if (projected) {  // out = h_full weight_hr^T
        rows_of_step(d_out, s, t).copy_(sa.dh);
        at::Tensor dh = rows_view(dh_full, 0, n);
        sa.dh = at::mm_out(dh, sa.dh, c.weight_hr);
      }
      if (n > 0) kernel(sa);  // an empty batch: nothing to launch
      sa.dc.copy_(sa.dc_prev);
      carry.to_previous(sa.dhproj, weight_hh);
    }
    copy_state_before(s, t, out, h0, rows_of_step(h_prev, s, t));
  }
  return {dgates.view(seq(4 * H)), dhproj.t().mm(h_prev), carry.dh, dc,
          column_sums(ran ? sums.dgamma_h : dgamma_h_rows.rows, gamma_h.scalar_type()),
          column_sums(ran ? sums.dbias : dgates, gamma_h.scalar_type()),
          column_sums(ran ? sums.dgamma_c : dgamma_c_rows.rows, gamma_c.scalar_type()),
          column_sums(ran ? sums.dbeta_c : dbeta_c_rows.rows, beta_c.scalar_type()),
          projected ? d_out.t().mm(h_full) : out.new_empty({0})};
}

// ---------------------------------------------------------------- LN-GRU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_fwd_impl(
    const at::Tensor& xzr, const at::Tensor& xn, const at::Tensor& weight_hh, const at::Tensor& h0_in,
    const at::Tensor& gamma_h, const at::Tensor& beta_h, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, double eps, bool save, GruCellKernel kernel) {
  const char* op = "ln_ext.gru_sequence_fwd";
  const Common c(op, weight_hh, h0_in, 3);
  const int64_t B = c.batch, H = c.hidden;
  const Steps s = make_steps(op, "xzr", xzr, batch_sizes, B, reverse);
  const auto seq = [&](int64_t n) { return like_xs(xzr, n); };
  const at::Tensor x_zr = as_rows(c.ck.io(xzr, "xzr", seq(2 * H)), 2 * H);
  const at::Tensor x_n = as_rows(c.ck.io(xn, "xn", seq(H)), H);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, H});
  GruCellArgs a;
  a.hidden = H;
  a.eps = eps;
  a.gamma_h = c.ck.io(gamma_h, "gamma_h", {3 * H});
  a.beta_h = c.ck.io(beta_h, "beta_h", {3 * H});
  const int64_t N = x_n.size(0);
  const auto io = x_n.options(), acc = io.dtype(acc_dtype(x_n.scalar_type()));
  at::Tensor out = at::empty({N, H}, io);
  const PerStepRows hproj(save, N, B, 3 * H, io), gates(save, N, B, 4 * H, acc), stats(save, N, B, 4, acc);
  at::Tensor staging = at::empty({B, H}, io);
  const at::Tensor w_t = step_gemm_weight(weight_hh);
  for (int64_t k = 0; k < s.count(); ++k) {
    const int64_t t = s.nth(k);
    a.batch = s.size[t];
    a.h_prev = state_before(s, t, out, h0, staging);
    a.hproj = hproj.of_step(s, t);
    at::mm_out(a.hproj, a.h_prev, w_t);
    a.xzr = rows_of_step(x_zr, s, t);
    a.xn = rows_of_step(x_n, s, t);
    a.h = rows_of_step(out, s, t);
    a.gates = gates.of_step(s, t);
    a.stats = stats.of_step(s, t);
    if (a.batch > 0) kernel(a);  // an empty batch: nothing to launch
  }
  return {out.view(seq(H)), final_state(s, out, h0), hproj.result(seq(3 * H)), gates.result(seq(4 * H)),
          stats.result(seq(4))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_bwd_impl(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& weight_hh,
    const at::Tensor& h0_in, const at::Tensor& output, const at::Tensor& hproj, const at::Tensor& gates,
    const at::Tensor& stats, const at::Tensor& gamma_h, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, GruCellKernel kernel) {
  const char* op = "ln_ext.gru_sequence_bwd";
  const Common c(op, weight_hh, h0_in, 3);
  const int64_t B = c.batch, H = c.hidden;
  const Steps s = make_steps(op, "output", output, batch_sizes, B, reverse);
  const auto seq = [&](int64_t n) { return like_xs(output, n); };
  const at::Tensor dout = as_rows(c.ck.io(grad_output, "grad_output", seq(H)), H);
  const at::Tensor out = as_rows(c.ck.io(output, "output", seq(H)), H);
  const at::Tensor hp = as_rows(c.ck.io(hproj, "hproj", seq(3 * H)), 3 * H);
  const at::Tensor gt = as_rows(c.ck.acc(gates, "gates", seq(4 * H)), 4 * H);
  const at::Tensor st = as_rows(c.ck.acc(stats, "stats", seq(4)), 4);
  const at::Tensor h0 = c.ck.io(h0_in, "h0", {B, H});
  Carry carry(c.ck.io(grad_h_n, "grad_h_n", {B, H}));
  GruCellArgs a;
  a.hidden = H;
  a.gamma_h = c.ck.io(gamma_h, "gamma_h", {3 * H});
  const int64_t N = out.size(0);
  const auto io = out.options(), acc = io.dtype(acc_dtype(out.scalar_type()));
  at::Tensor dxzr = at::empty({N, 2 * H}, io), dxn = at::empty({N, H}, io);
  at::Tensor dhproj = at::empty({N, 3 * H}, io), h_prev = at::empty({N, H}, io);
  at::Tensor dh_direct = at::empty({B, H}, io);
  at::Tensor dgamma_h_rows = at::empty({N, 3 * H}, acc), dbeta_h_rows = at::empty({N, 3 * H}, acc);
  for (int64_t k = s.count() - 1; k >= 0; --k) {
    const int64_t t = s.nth(k), n = s.size[t];
    a.batch = n;
    a.dh = carry.step_grad(rows_of_step(dout, s, t));
    a.h_prev = rows_of_step(h_prev, s, t);
    copy_state_before(s, t, out, h0, a.h_prev);
    a.hproj = rows_of_step(hp, s, t);
    a.gates = rows_of_step(gt, s, t);
    a.stats = rows_of_step(st, s, t);
    a.dxzr = rows_of_step(dxzr, s, t);
    a.dxn = rows_of_step(dxn, s, t);
    a.dhproj = rows_of_step(dhproj, s, t);
    a.dh_prev = rows_view(dh_direct, 0, n);
    a.dgamma_h_rows = rows_of_step(dgamma_h_rows, s, t);
    a.dbeta_h_rows = rows_of_step(dbeta_h_rows, s, t);
    if (a.batch > 0) kernel(a);  // an empty batch: nothing to launch
    // h_{t-1} reaches the loss through (1 - z) h_{t-1} and through W_h h_{t-1}.
    carry.to_previous(a.dhproj, weight_hh, a.dh_prev);
  }
  return {dxzr.view(seq(2 * H)), dxn.view(seq(H)), dhproj.t().mm(h_prev), carry.dh,
          column_sums(dgamma_h_rows, gamma_h.scalar_type()), column_sums(dbeta_h_rows, gamma_h.scalar_type())};
}

}  // namespace ln_ext
