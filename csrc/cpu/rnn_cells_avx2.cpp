// The LN-RNN cell kernels built for AVX2 + FMA + F16C (x86-64 only), used when the
// CPU has them: 8 float lanes and fused multiply-adds in every column loop. The
// target is switched on after every header (see rnn_cells_impl.h for why).
#include "rnn_cells_cpu.h"

#ifdef LN_EXT_CPU_AVX2

#include "avx2_target_push.h"

#define LN_EXT_ISA_NAME "avx2"
#define LN_EXT_GEMM_VEC_BYTES 32
#include "rnn_cells_impl.h"

#include "avx2_target_pop.h"

namespace ln_ext::cpu {
CellKernelSet cell_kernels_avx2() { return make_cell_kernel_set(); }
}  // namespace ln_ext::cpu
#endif  // LN_EXT_CPU_AVX2
