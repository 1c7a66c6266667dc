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
at::Tensor pack_panels(const at::Tensor& b, int64_t panel) {
  const int64_t K = b.size(0), cols = b.size(1), panels = (cols + panel - 1) / panel;
  const int64_t sk = b.stride(0), sj = b.stride(1);
  at::Tensor packed = at::zeros({panels, K, panel}, b.options());
  const float* in = b.const_data_ptr<float>();
  float* out = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t width = std::min(panel, cols - p * panel);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < width; ++j) out[(p * K + k) * panel + j] = in[k * sk + (p * panel + j) * sj];
      }
    }
  });
  return packed;
}

// How many threads a loop's steps take: at most torch's, at most one per GEMM panel, and
// at least kMinStepFmas multiply-adds of the widest step's GEMM each.
constexpr int64_t kMinStepFmas = 1 << 17;
int team_size(int64_t fmas, int64_t panels) {
  if (at::in_parallel_region()) return 1;  // inside another team: no threads^2 workers
  return static_cast<int>(std::clamp<int64_t>(fmas / kMinStepFmas, 1, std::min<int64_t>(at::get_num_threads(), panels)));
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

// The fused LSTM loops (float32): every step's GEMM split by column panels and its cell by
// rows over one OpenMP team that lives for the whole sequence, two barriers a step (the
// cell needs every column of its rows' GEMM output, the next GEMM every row of the cell's).
// Against a BLAS call and a cell launch per step this drops two fork/joins and the BLAS's
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
  run_team(team_size(widest * K * cols, panels), [&](int team, int me, const auto& barrier) {
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
                         const at::Tensor& weight_hh, const at::Tensor& carry) {
  if (!fused_loops_apply(weight_hh, count > 0)) return false;
  const cpu::CellKernelSet& set = cpu::cell_kernels();
  const cpu::StepGemm gemm = set.gemm_f32;
  const auto& cells = set.get<float>();
  const int64_t K = weight_hh.size(0), cols = weight_hh.size(1), H = K / 4;
  const at::Tensor packed = pack_panels(weight_hh, gemm.panel);  // dhproj W_h
  const float* w = packed.const_data_ptr<float>();
  float* carried = carry.data_ptr<float>();
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
  run_team(team_size(widest * K * cols, panels), [&](int team, int me, const auto& barrier) {
    const auto [p0, p1] = share(panels, team, me);
    for (const Step& st : run) {
      const auto [r0, r1] = share(st.batch, team, me);
      for (int64_t i = r0 * cols; i < r1 * cols; ++i) st.dh[i] = st.dout[i] + carried[i];
      if (r0 < r1) cells.lstm_bwd(st.rows, r0, r1, H);
      std::copy(st.dc_prev + r0 * H, st.dc_prev + r1 * H, st.dc + r0 * H);
      barrier();
      gemm.run(st.dhproj, K, st.batch, w, K, p0, p1, carried, cols, cols);
      barrier();
    }
  });
  return true;
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
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
