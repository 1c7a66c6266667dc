// The LN-RNN cell kernels built for AVX-512 (x86-64 only), used when the CPU has it,
// on 256-bit vectors (avx512_target_push.h says why, with the timings). The cells'
// column loops are plain loops that gcc vectorizes (kernels/rnn_cells.cuh), so another
// target is all it takes (the LayerNorm row kernels have their own AVX-512 build,
// row_kernels_avx512.cpp). The fused LSTM loops' step GEMM (rnn_cells_impl.h) runs tiles
// of 8 rows x 32 columns on 512-bit vectors, 16 accumulators in AVX-512's 32 registers.
// On Zen 4 (512-bit multiply-adds split in two) that is the AVX2 build's speed (T32 B16,
// 2 threads, LSTM sequence op: H = 128 / 512 0.61 / 6.23 ms vs 0.62 / 6.14); CPUs with
// full-width FMA units are where it should gain (not measured here).
// The target is switched on after every header (see rnn_cells_impl.h).
#include "rnn_cells_cpu.h"

#ifdef LN_EXT_CPU_AVX2

#include "avx512_target_push.h"

#define LN_EXT_ISA_NAME "avx512"
#define LN_EXT_GEMM_VEC_BYTES 64
#define LN_EXT_GEMM_ROWS 8
#include "rnn_cells_impl.h"

#include "avx512_target_pop.h"

namespace ln_ext::cpu {
CellKernelSet cell_kernels_avx512() { return make_cell_kernel_set(); }
}  // namespace ln_ext::cpu
#endif  // LN_EXT_CPU_AVX2
