// The LN-RNN cell kernels built for AVX-512 (x86-64 only), used when the CPU has it,
// on 256-bit vectors (avx512_target_push.h says why, with the timings). The cells'
// column loops are plain loops that gcc vectorizes (kernels/rnn_cells.cuh), so another
// target is all it takes; the LayerNorm row kernels are written in 32-byte vectors and
// stay AVX2. The target is switched on after every header (see rnn_cells_impl.h).
#include "rnn_cells_cpu.h"

#ifdef LN_EXT_CPU_AVX2

#include "avx512_target_push.h"

#define LN_EXT_ISA_NAME "avx512"
#include "rnn_cells_impl.h"

#include "avx512_target_pop.h"

namespace ln_ext::cpu {
CellKernelSet cell_kernels_avx512() { return make_cell_kernel_set(); }
}  // namespace ln_ext::cpu
#endif  // LN_EXT_CPU_AVX2
