// The row kernels built for the compiler's baseline ISA: the path on every CPU.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#define LN_EXT_ISA_NAME "generic"
#include "row_kernels_impl.h"

namespace ln_ext::cpu {
RowKernels row_kernels_generic() { return make_row_kernels(); }
}  // namespace ln_ext::cpu
