// The LN-RNN cell kernels built for the compiler's baseline ISA: the path on every CPU.
#include "rnn_cells_cpu.h"

#define LN_EXT_ISA_NAME "generic"
#include "rnn_cells_impl.h"

namespace ln_ext::cpu {
CellKernelSet cell_kernels_generic() { return make_cell_kernel_set(); }
}  // namespace ln_ext::cpu
