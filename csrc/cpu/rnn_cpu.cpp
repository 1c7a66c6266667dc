// LN-RNN cell ops on the CPU: at::parallel_for over ranges of batch rows, each
// range run on one thread by the cell kernels built for this CPU (rnn_cells_cpu.h),
// which run the row functions shared with CUDA (kernels/rnn_cells.cuh).
#include "../rnn.h"
#include "../rnn_rows.h"
#include "rnn_cells_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ln_ext {

namespace cpu {
const CellKernelSet& cell_kernels() {
  static const CellKernelSet chosen = [] {
#ifdef LN_EXT_CPU_AVX2
    // The row kernels' choice (AVX2 and above, or generic) is the cells' too.
    if (std::strcmp(row_kernels().isa, "avx512") == 0) return cell_kernels_avx512();
    if (std::strcmp(row_kernels().isa, "avx2") == 0) return cell_kernels_avx2();
#endif
    return cell_kernels_generic();
  }();
  return chosen;
}
}  // namespace cpu

namespace {

// Runs fn(begin, end) over ranges of the batch rows, at least kMinTaskCols
// columns (rows * `cols`, the widest operand of a row) per task: about 2 us of
// vectorized cell math, more than the fork/join of an OpenMP region costs. At
// B = 16 an LSTM or GRU step with H >= 128 thus runs on 2 threads (layer
// fwd+bwd at T = 32 measured 0-8% faster than with one task; the old grain of
// 16384 columns, sized for scalar libm math, kept them on one); an RNN step
// with H = 128 stays on one. Each row is computed whole by one thread, so the result
// does not depend on the thread count.
constexpr int64_t kMinTaskCols = 2048;

template <class Fn>
void for_row_ranges(int64_t batch, int64_t cols, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskCols / std::max<int64_t>(cols, 1));
  at::parallel_for(0, batch, grain, fn);
}

#define LN_EXT_CELL_DISPATCH(ARGS, NAME, ...)                                         \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (ARGS).hproj.scalar_type(), \
                                  NAME, [&] {                                          \
                                    using A = at::opmath_type<scalar_t>;               \
                                    const auto rows = rows_of<scalar_t, A>(ARGS);      \
                                    const int64_t H = (ARGS).hidden;                   \
                                    const auto& k = cpu::cell_kernels().get<scalar_t>(); \
                                    __VA_ARGS__                                        \
                                  })

}  // namespace

void rnn_cell_fwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "rnn_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_row_ranges(a.batch, H, [&](int64_t b0, int64_t b1) { k.rnn_fwd(rows, b0, b1, H, eps); });
  });
}

void rnn_cell_bwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "rnn_cell_bwd_cpu", {
    for_row_ranges(a.batch, H, [&](int64_t b0, int64_t b1) { k.rnn_bwd(rows, b0, b1, H); });
  });
}

void lstm_cell_fwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "lstm_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_row_ranges(a.batch, 4 * H, [&](int64_t b0, int64_t b1) { k.lstm_fwd(rows, b0, b1, H, eps); });
  });
}

void lstm_cell_bwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "lstm_cell_bwd_cpu", {
    for_row_ranges(a.batch, 4 * H, [&](int64_t b0, int64_t b1) { k.lstm_bwd(rows, b0, b1, H); });
  });
}

void gru_cell_fwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "gru_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_row_ranges(a.batch, 3 * H, [&](int64_t b0, int64_t b1) { k.gru_fwd(rows, b0, b1, H, eps); });
  });
}

void gru_cell_bwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "gru_cell_bwd_cpu", {
    for_row_ranges(a.batch, 3 * H, [&](int64_t b0, int64_t b1) { k.gru_bwd(rows, b0, b1, H); });
  });
}

namespace {

// b [K, cols] (float, any strides) as the step GEMM's packed right operand (StepGemm):
// panel p holds columns [p * panel, (p + 1) * panel), k-major, zero past the last column.
// Read along b's shorter stride (a weight's transpose: down its columns).
at::Tensor pack_panels(const at::Tensor& b, int64_t panel) {
  const int64_t K = b.size(0), cols = b.size(1), panels = (cols + panel - 1) / panel;
  const int64_t sk = b.stride(0), sj = b.stride(1);
  at::Tensor packed = at::empty({panels, K, panel}, b.options());
  const float* in = b.const_data_ptr<float>();
  float* out = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = std::min(panel, cols - p * panel);
      float* dst = out + p * K * panel;
      const float* src = in + p * panel * sj;
      if (sk <= sj) {
        for (int64_t j = 0; j < width; ++j) {
          for (int64_t k = 0; k < K; ++k) dst[k * panel + j] = src[k * sk + j * sj];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < width; ++j) dst[k * panel + j] = src[k * sk + j * sj];
        }
      }
      for (int64_t k = 0; width < panel && k < K; ++k) std::fill(dst + k * panel + width, dst + (k + 1) * panel, 0.0f);
    }
  });
  return packed;
}

// How a team of the fused loops splits each step. By rows when every member gets a full
// register tile of the widest step's rows: a step's rows are independent of each other
// (a row's GEMM output, its cell and its next state or carried gradient are that row's
// alone), so a member keeps its rows through the whole sequence with no barrier at all.
// Else (few rows) by the GEMM's column panels, the cell by rows, two barriers a step.
// Measured (LN-LSTM layer, T32 B16, 2 threads, AMD EPYC Zen 4, interleaved rounds): by
// rows / by panels 0.97-1.02 at H = 128, 256, 512, forward and backward; chosen for the
// cache (a row's GEMM output read by its cell on the same core) and no waits on a
// neighbour's share on a shared machine.
struct TeamPlan {
  int size;      // threads: at most torch's, at most one per panel (or tile of rows), and
                 // at least kMinStepFmas multiply-adds of the widest step's GEMM each
  bool by_rows;
};
constexpr int64_t kMinStepFmas = 1 << 17;
TeamPlan plan_team(int64_t widest, int64_t K, int64_t cols, int64_t panels, const cpu::StepGemm& gemm) {
  if (at::in_parallel_region()) return {1, false};  // inside another team: no threads^2 workers
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (widest * K * cols) / kMinStepFmas);
  if (threads >= 2 && widest >= 2 * gemm.tile_rows) {
    return {static_cast<int>(std::min(threads, widest / gemm.tile_rows)), true};
  }
  return {static_cast<int>(std::clamp<int64_t>(threads, 1, panels)), false};
}

// Whether the fused loops take a sequence: float32 steps, and a team to run them on (a build
// without OpenMP would run them on one thread where the per-step loop's BLAS has several).
bool fused_loops_apply(const at::Tensor& weight_hh, bool any_steps) {
#ifndef _OPENMP
  if (at::get_num_threads() > 1) return false;
#endif
  return weight_hh.scalar_type() == at::kFloat && any_steps;
}

// Runs member(team, me, barrier) on every thread of one OpenMP team of `size` (fewer where
// OpenMP gives fewer, as inside another parallel region); barrier() waits for the team.
template <class Member>
void run_team(int size, const Member& member) {
#ifdef _OPENMP
  if (size > 1) {
    const auto barrier = [] {
#pragma omp barrier
    };
#pragma omp parallel num_threads(size)
    member(omp_get_num_threads(), omp_get_thread_num(), barrier);
    return;
  }
#endif
  member(1, 0, [] {});
}

// [begin, end) of `n` items for member `me` of a team of `team`: near-equal contiguous shares.
std::pair<int64_t, int64_t> share(int64_t n, int team, int me) {
  return {n * me / team, n * (me + 1) / team};
}

// The fused LSTM loops (float32): every step's GEMM and cell over one OpenMP team that lives
// for the whole sequence, split as TeamPlan says (by rows: no barrier; by panels: two a step,
// as the cell needs every column of its rows' GEMM output, the next GEMM every row of the
// cell's). The backward adds each step's parameter gradient rows into per-row sums
// (LstmGradSums) while they are in cache. Against a BLAS call and a cell launch per step this drops two fork/joins and the BLAS's
// repacking of the weight every step (packed here once per call); benchmarks/NOTES.md has
// the numbers. The loops' results do not depend on the thread count (StepGemm; a row's cell
// on one thread); nothing inside a team may throw (an exception leaving an OpenMP region
// terminates the process).
// The steps are taken as raw pointers, the step's views dropped: the op's tensors they point
// into live through the call.
bool lstm_steps_cpu(int64_t count, c10::function_ref<LstmStep(int64_t)> step, const at::Tensor& weight_hh) {
  if (!fused_loops_apply(weight_hh, count > 0)) return false;
  const cpu::CellKernelSet& set = cpu::cell_kernels();
  const cpu::StepGemm gemm = set.gemm_f32;
  const auto& cells = set.get<float>();
  const int64_t cols = weight_hh.size(0), K = weight_hh.size(1), H = cols / 4;
  const at::Tensor packed = pack_panels(weight_hh.t(), gemm.panel);  // h_prev W_h^T
  const float* w = packed.const_data_ptr<float>();
  struct Step {
    const float* h_prev;
    float* hproj;
    int64_t batch;
    cell::LstmRow<float, float> rows;
  };
  std::vector<Step> run;
  int64_t widest = 0;
  float eps = 0;
  for (int64_t k = 0; k < count; ++k) {
    const LstmStep st = step(k);
    run.push_back({st.h_prev.const_data_ptr<float>(), st.cell.hproj.data_ptr<float>(), st.cell.batch,
                   rows_of<float, float>(st.cell)});
    widest = std::max(widest, st.cell.batch);
    eps = static_cast<float>(st.cell.eps);
  }
  const int64_t panels = packed.size(0);
  const TeamPlan plan = plan_team(widest, K, cols, panels, gemm);
  run_team(plan.size, [&](int team, int me, const auto& barrier) {
    if (plan.by_rows) {
      const auto [r0, widest_r1] = share(widest, team, me);
      for (const Step& st : run) {
        const int64_t r1 = std::min(widest_r1, st.batch);  // packed: later steps hold fewer rows
        if (r0 >= r1) continue;
        gemm.run(st.h_prev + r0 * K, K, r1 - r0, w, K, 0, panels, st.hproj + r0 * cols, cols, cols);
        cells.lstm_fwd(st.rows, r0, r1, H, eps);
      }
      return;
    }
    const auto [p0, p1] = share(panels, team, me);
    for (const Step& st : run) {
      gemm.run(st.h_prev, K, st.batch, w, K, p0, p1, st.hproj, cols, cols);
      barrier();
      const auto [r0, r1] = share(st.batch, team, me);
      if (r0 < r1) cells.lstm_fwd(st.rows, r0, r1, H, eps);
      barrier();
    }
  });
  return true;
}

bool lstm_back_steps_cpu(int64_t count, c10::function_ref<LstmBackStep(int64_t)> step,
                         const at::Tensor& weight_hh, const at::Tensor& carry, const LstmGradSums& sums) {
  if (!fused_loops_apply(weight_hh, count > 0)) return false;
  const cpu::CellKernelSet& set = cpu::cell_kernels();
  const cpu::StepGemm gemm = set.gemm_f32;
  const auto& cells = set.get<float>();
  const int64_t K = weight_hh.size(0), cols = weight_hh.size(1), H = K / 4;
  const at::Tensor packed = pack_panels(weight_hh, gemm.panel);  // dhproj W_h
  const float* w = packed.const_data_ptr<float>();
  float* carried = carry.data_ptr<float>();
  float *sum_gamma_h = sums.dgamma_h.data_ptr<float>(), *sum_bias = sums.dbias.data_ptr<float>();
  float *sum_gamma_c = sums.dgamma_c.data_ptr<float>(), *sum_beta_c = sums.dbeta_c.data_ptr<float>();
  struct Step {
    const float* dout;
    float *dh, *dc, *dc_prev, *dhproj;
    int64_t batch;
    cell::LstmRow<float, float> rows;
  };
  std::vector<Step> run;
  int64_t widest = 0;
  for (int64_t k = 0; k < count; ++k) {
    const LstmBackStep st = step(k);
    const LstmCellArgs& c = st.cell;
    run.push_back({st.dout.const_data_ptr<float>(), c.dh.data_ptr<float>(), c.dc.data_ptr<float>(),
                   c.dc_prev.data_ptr<float>(), c.dhproj.data_ptr<float>(), c.batch, rows_of<float, float>(c)});
    widest = std::max(widest, c.batch);
  }
  const int64_t panels = packed.size(0);
  const TeamPlan plan = plan_team(widest, K, cols, panels, gemm);
  run_team(plan.size, [&](int team, int me, const auto& barrier) {
    // Rows [r0, r1) of a step: the cell's backward, its parameter gradient rows added into
    // those rows' sums (still in cache), then (the caller) their gradient reaching h_{t-1}.
    const auto add_rows = [&](float* sum, const float* rows, int64_t r0, int64_t r1, int64_t n) {
      for (int64_t i = r0 * n; i < r1 * n; ++i) sum[i] += rows[i];
    };
    const auto cell_rows = [&](const Step& st, int64_t r0, int64_t r1) {
      for (int64_t i = r0 * cols; i < r1 * cols; ++i) st.dh[i] = st.dout[i] + carried[i];
      if (r0 < r1) cells.lstm_bwd(st.rows, r0, r1, H);
      std::copy(st.dc_prev + r0 * H, st.dc_prev + r1 * H, st.dc + r0 * H);
      add_rows(sum_gamma_h, st.rows.dgamma_h_rows, r0, r1, 4 * H);
      add_rows(sum_bias, st.rows.dgates, r0, r1, 4 * H);
      add_rows(sum_gamma_c, st.rows.dgamma_c_rows, r0, r1, H);
      add_rows(sum_beta_c, st.rows.dbeta_c_rows, r0, r1, H);
    };
    if (plan.by_rows) {
      const auto [r0, widest_r1] = share(widest, team, me);
      for (const Step& st : run) {
        const int64_t r1 = std::min(widest_r1, st.batch);  // packed: the first steps run hold fewer rows
        if (r0 >= r1) continue;
        cell_rows(st, r0, r1);
        gemm.run(st.dhproj + r0 * K, K, r1 - r0, w, K, 0, panels, carried + r0 * cols, cols, cols);
      }
      return;
    }
    const auto [p0, p1] = share(panels, team, me);
    for (const Step& st : run) {
      const auto [r0, r1] = share(st.batch, team, me);
      cell_rows(st, r0, r1);
      barrier();
      gemm.run(st.dhproj, K, st.batch, w, K, p0, p1, carried, cols, cols);
      barrier();
    }
  });
  return true;
}

// x @ weight^T (input_projection): float32 rows in chunks of kProjectionRows over torch's
// threads, each chunk running every panel of the weight (packed once per call) through the
// step GEMM's register tiles; an output is summed by one tile whatever the split. MKL's sgemm
// for these shapes also runs a pass zeroing the output and packs both operands: against
// F.linear (AMD EPYC Zen 4, 2 threads, same run), rows x in -> out 512x128->512 0.92-0.99x the
// time, 2048x128->512 0.85-0.89x, 2048x512->2048 0.85x, 4096x1024->4096 0.88-0.92x; below
// kMinProjectionRows the packing is not paid back (16 rows: 1.5x), so at::linear runs those.
// The error is no larger than MKL's (blocked sums, kGemmDepth): tests/test_rnn.py.
constexpr int64_t kProjectionRows = 64, kMinProjectionRows = 256;
at::Tensor input_projection_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_input_projection(x, weight);
  const int64_t in_features = x.size(-1), rows = in_features ? x.numel() / in_features : 0;
  if (x.scalar_type() != at::kFloat || rows < kMinProjectionRows) return at::linear(x, weight);
  const cpu::StepGemm gemm = cpu::cell_kernels().gemm_f32;
  const int64_t K = weight.size(1), cols = weight.size(0);
  const at::Tensor a = x.reshape({-1, K}).contiguous();
  at::Tensor out = at::empty({rows, cols}, a.options());
  const at::Tensor packed = pack_panels(weight.t(), gemm.panel);
  const float* in = a.const_data_ptr<float>();
  const float* w = packed.const_data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t panels = packed.size(0), chunks = (rows + kProjectionRows - 1) / kProjectionRows;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kProjectionRows, n = std::min(kProjectionRows, rows - r0);
      gemm.run(in + r0 * K, K, n, w, K, 0, panels, y + r0 * cols, cols, cols);
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(cols);
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  m.impl("input_projection", &input_projection_cpu);
  m.impl("rnn_cell_fwd", &rnn_cell_fwd_op<rnn_cell_fwd_cpu_kernel>);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd_op<rnn_cell_bwd_cpu_kernel>);
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_op<lstm_cell_fwd_cpu_kernel>);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_op<lstm_cell_bwd_cpu_kernel>);
  m.impl("gru_cell_fwd", &gru_cell_fwd_op<gru_cell_fwd_cpu_kernel>);
  m.impl("gru_cell_bwd", &gru_cell_bwd_op<gru_cell_bwd_cpu_kernel>);
  using Rnn = RnnSequenceOps<rnn_cell_fwd_cpu_kernel, rnn_cell_bwd_cpu_kernel>;
  using Lstm =
      LstmSequenceOps<lstm_cell_fwd_cpu_kernel, lstm_cell_bwd_cpu_kernel, lstm_steps_cpu, lstm_back_steps_cpu>;
  using Gru = GruSequenceOps<gru_cell_fwd_cpu_kernel, gru_cell_bwd_cpu_kernel>;
  m.impl("rnn_sequence_fwd", &Rnn::fwd);
  m.impl("rnn_sequence_bwd", &Rnn::bwd);
  m.impl("lstm_sequence_fwd", &Lstm::fwd);
  m.impl("lstm_sequence_bwd", &Lstm::bwd);
  m.impl("gru_sequence_fwd", &Gru::fwd);
  m.impl("gru_sequence_bwd", &Gru::bwd);
}

}  // namespace ln_ext
