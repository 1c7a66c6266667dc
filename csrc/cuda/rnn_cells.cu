// LN-RNN cell ops on CUDA: launchers (device guard, current stream, dtype
// dispatch) for the one-block-per-row kernels of kernels/rnn_cells.cuh.
//
// Launch shape: grid = batch rows, block = min(256, H rounded up to a warp)
// threads; each thread owns columns j, j + blockDim, ... of its row in every
// pass. Unverified on a GPU so far (built for sm_90 without one).
#include "../rnn.h"
#include "../rnn_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace ln_ext {
namespace {

// Enough threads that a row's columns spread over the block, but not more than
// there are columns per gate.
int threads_for(int64_t H) {
  const int64_t warps = std::min<int64_t>(8, (H + 31) / 32);
  return static_cast<int>(32 * std::max<int64_t>(warps, 1));
}

template <class Args>
dim3 grid_for(const Args& a) {
  TORCH_CHECK(a.batch <= std::numeric_limits<int32_t>::max(),
              "ln_ext: LN-RNN cell ops take at most 2^31 - 1 rows, got ", a.batch);
  return dim3(static_cast<unsigned>(a.batch));
}

// Dispatches on the io dtype; inside, `rows` are the operands as row structs,
// `H` the hidden size, `stream` the current stream, `threads` the block size.
#define LN_EXT_CELL_LAUNCH(ARGS, NAME, ...)                                                  \
  do {                                                                                       \
    const c10::cuda::CUDAGuard guard((ARGS).hproj.device());                                 \
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();                            \
    const int threads = threads_for((ARGS).hidden);                                          \
    const dim3 grid = grid_for(ARGS);                                                        \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (ARGS).hproj.scalar_type(),    \
                                    NAME, [&] {                                              \
                                      using A = at::opmath_type<scalar_t>;                   \
                                      const auto rows = rows_of<scalar_t, A>(ARGS);          \
                                      const int64_t H = (ARGS).hidden;                       \
                                      __VA_ARGS__                                            \
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();                        \
                                    });                                                      \
  } while (0)

}  // namespace

void rnn_cell_fwd_cuda_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "rnn_cell_fwd_cuda", {
    cell::rnn_fwd_kernel<<<grid, threads, 0, stream>>>(rows, H, static_cast<A>(a.eps));
  });
}

void rnn_cell_bwd_cuda_kernel(const RnnCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "rnn_cell_bwd_cuda", {
    cell::rnn_bwd_kernel<<<grid, threads, 0, stream>>>(rows, H);
  });
}

void lstm_cell_fwd_cuda_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "lstm_cell_fwd_cuda", {
    cell::lstm_fwd_kernel<<<grid, threads, 0, stream>>>(rows, H, static_cast<A>(a.eps));
  });
}

void lstm_cell_bwd_cuda_kernel(const LstmCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "lstm_cell_bwd_cuda", {
    cell::lstm_bwd_kernel<<<grid, threads, 0, stream>>>(rows, H);
  });
}

void gru_cell_fwd_cuda_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "gru_cell_fwd_cuda", {
    cell::gru_fwd_kernel<<<grid, threads, 0, stream>>>(rows, H, static_cast<A>(a.eps));
  });
}

void gru_cell_bwd_cuda_kernel(const GruCellArgs& a) {
  LN_EXT_CELL_LAUNCH(a, "gru_cell_bwd_cuda", {
    cell::gru_bwd_kernel<<<grid, threads, 0, stream>>>(rows, H);
  });
}

TORCH_LIBRARY_IMPL(ln_ext, CUDA, m) {
  m.impl("input_projection", &input_projection_by_linear);  // cuBLAS
  m.impl("rnn_cell_fwd", &rnn_cell_fwd_op<rnn_cell_fwd_cuda_kernel>);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd_op<rnn_cell_bwd_cuda_kernel>);
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_op<lstm_cell_fwd_cuda_kernel>);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_op<lstm_cell_bwd_cuda_kernel>);
  m.impl("gru_cell_fwd", &gru_cell_fwd_op<gru_cell_fwd_cuda_kernel>);
  m.impl("gru_cell_bwd", &gru_cell_bwd_op<gru_cell_bwd_cuda_kernel>);
  using Rnn = RnnSequenceOps<rnn_cell_fwd_cuda_kernel, rnn_cell_bwd_cuda_kernel>;
  using Lstm = LstmSequenceOps<lstm_cell_fwd_cuda_kernel, lstm_cell_bwd_cuda_kernel>;
  using Gru = GruSequenceOps<gru_cell_fwd_cuda_kernel, gru_cell_bwd_cuda_kernel>;
  m.impl("rnn_sequence_fwd", &Rnn::fwd);
  m.impl("rnn_sequence_bwd", &Rnn::bwd);
  m.impl("lstm_sequence_fwd", &Lstm::fwd);
  m.impl("lstm_sequence_bwd", &Lstm::bwd);
  m.impl("gru_sequence_fwd", &Gru::fwd);
  m.impl("gru_sequence_bwd", &Gru::bwd);
}

}  // namespace ln_ext
