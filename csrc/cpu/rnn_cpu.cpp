// LN-RNN cell ops on the CPU: at::parallel_for over the batch rows, each row
// run on one thread by the row functions shared with CUDA (kernels/rnn_cells.cuh).
#include "../rnn.h"
#include "../rnn_rows.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace ln_ext {
namespace {

// Runs row_fn(row operands) for every batch row; `cols` sizes the grain so that
// a task holds enough work to be worth scheduling.
template <class Row, class Fn>
void for_each_row(const Row& rows, int64_t batch, int64_t H, int64_t cols, Fn row_fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row_fn(rows.at(b, H));
  });
}

#define LN_EXT_CELL_DISPATCH(ARGS, NAME, ...)                                         \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (ARGS).hproj.scalar_type(), \
                                  NAME, [&] {                                          \
                                    using A = at::opmath_type<scalar_t>;               \
                                    const auto rows = rows_of<scalar_t, A>(ARGS);      \
                                    const int64_t H = (ARGS).hidden;                   \
                                    const cell::SerialRow one;                         \
                                    __VA_ARGS__                                        \
                                  })

}  // namespace

void rnn_cell_fwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "rnn_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_each_row(rows, a.batch, H, H, [&](const auto& r) { cell::rnn_fwd_row(one, r, H, eps); });
  });
}

void rnn_cell_bwd_cpu_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "rnn_cell_bwd_cpu", {
    for_each_row(rows, a.batch, H, H, [&](const auto& r) { cell::rnn_bwd_row(one, r, H); });
  });
}

void lstm_cell_fwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "lstm_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_each_row(rows, a.batch, H, 4 * H, [&](const auto& r) { cell::lstm_fwd_row(one, r, H, eps); });
  });
}

void lstm_cell_bwd_cpu_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "lstm_cell_bwd_cpu", {
    for_each_row(rows, a.batch, H, 4 * H, [&](const auto& r) { cell::lstm_bwd_row(one, r, H); });
  });
}

void gru_cell_fwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "gru_cell_fwd_cpu", {
    const A eps = static_cast<A>(a.eps);
    for_each_row(rows, a.batch, H, 3 * H, [&](const auto& r) { cell::gru_fwd_row(one, r, H, eps); });
  });
}

void gru_cell_bwd_cpu_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_DISPATCH(a, "gru_cell_bwd_cpu", {
    for_each_row(rows, a.batch, H, 3 * H, [&](const auto& r) { cell::gru_bwd_row(one, r, H); });
  });
}

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  m.impl("rnn_cell_fwd", &rnn_cell_fwd_op<rnn_cell_fwd_cpu_kernel>);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd_op<rnn_cell_bwd_cpu_kernel>);
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_op<lstm_cell_fwd_cpu_kernel>);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_op<lstm_cell_bwd_cpu_kernel>);
  m.impl("gru_cell_fwd", &gru_cell_fwd_op<gru_cell_fwd_cpu_kernel>);
  m.impl("gru_cell_bwd", &gru_cell_bwd_op<gru_cell_bwd_cpu_kernel>);
}

}  // namespace ln_ext
