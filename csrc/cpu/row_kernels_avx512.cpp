// The row kernels built for AVX-512 (F, BW, DQ, VL; x86-64 only) on 64-byte vectors, used
// when the CPU has them: twice the AVX2 build's lanes per instruction, and the 16-bit
// conversions on 16 lanes. Unlike the LN-RNN cells (avx512_target_push.h), whose sigmoid
// divisions lose on 512-bit vectors, the rows are adds and multiply-adds, which gain.
// Measured (1 thread of an AMD EPYC, [2048, 4096], AVX-512 / AVX2 build / torch 2.14, ms):
// float32 fwd 3.99 / 4.26 / 4.82, bwd 6.38 / 6.54 / 7.80; bfloat16 fwd 2.76 / 3.19 / 3.69,
// bwd 4.56 / 5.49 / 8.30.
// The target is switched on after the standard headers, as in row_kernels_avx2.cpp.
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

#include "avx512_target_push.h"

#define LN_EXT_ISA_NAME "avx512"
#define LN_EXT_VEC_BYTES 64
#define LN_EXT_AVX512 1
#include "row_kernels_impl.h"

#include "avx512_target_pop.h"

namespace ln_ext::cpu {
RowKernels row_kernels_avx512() { return make_row_kernels(); }
}  // namespace ln_ext::cpu
#endif  // LN_EXT_CPU_AVX2
