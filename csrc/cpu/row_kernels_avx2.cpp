// The row kernels built for AVX2 + FMA + F16C (x86-64 only), used when the CPU
// has them. The target is switched on after the standard headers, so only the
// kernels themselves (internal linkage, see row_kernels_impl.h) use it; the
// torch extension is built for the baseline ISA, which is why this file exists.
#include "row_kernels.h"

#ifdef LN_EXT_CPU_AVX2
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#include "avx2_target_push.h"

#define LN_EXT_ISA_NAME "avx2"
#define LN_EXT_F16C 1
#include "row_kernels_impl.h"

#include "avx2_target_pop.h"

namespace ln_ext::cpu {
RowKernels row_kernels_avx2() { return make_row_kernels(); }
}  // namespace ln_ext::cpu
#endif  // LN_EXT_CPU_AVX2
