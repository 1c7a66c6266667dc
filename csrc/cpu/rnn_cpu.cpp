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

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  m.impl("rnn_cell_fwd", &rnn_cell_fwd_op<rnn_cell_fwd_cpu_kernel>);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd_op<rnn_cell_bwd_cpu_kernel>);
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_op<lstm_cell_fwd_cpu_kernel>);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_op<lstm_cell_bwd_cpu_kernel>);
  m.impl("gru_cell_fwd", &gru_cell_fwd_op<gru_cell_fwd_cpu_kernel>);
  m.impl("gru_cell_bwd", &gru_cell_bwd_op<gru_cell_bwd_cpu_kernel>);
  using Rnn = RnnSequenceOps<rnn_cell_fwd_cpu_kernel, rnn_cell_bwd_cpu_kernel>;
  using Lstm = LstmSequenceOps<lstm_cell_fwd_cpu_kernel, lstm_cell_bwd_cpu_kernel>;
  using Gru = GruSequenceOps<gru_cell_fwd_cpu_kernel, gru_cell_bwd_cpu_kernel>;
  m.impl("rnn_sequence_fwd", &Rnn::fwd);
  m.impl("rnn_sequence_bwd", &Rnn::bwd);
  m.impl("lstm_sequence_fwd", &Lstm::fwd);
  m.impl("lstm_sequence_bwd", &Lstm::bwd);
  m.impl("gru_sequence_fwd", &Gru::fwd);
  m.impl("gru_sequence_bwd", &Gru::bwd);
}

}  // namespace ln_ext
