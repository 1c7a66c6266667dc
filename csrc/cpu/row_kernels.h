// Torch-free LayerNorm row kernels for the CPU, built once per instruction set.
//
// layer_norm_cpu.cpp (the torch side: checks, threads, dtypes) hands each thread a
// range of rows and calls these through a table chosen once per process for the
// CPU it runs on: AVX2+FMA+F16C on x86-64 when the CPU has them, else the generic
// build (the compiler's baseline ISA). The kernels include no torch header, so the
// AVX2 build cannot leak AVX2 copies of shared inline functions into the generic path.
//
// Shapes: x, y, dy, dx: [rows, n] row-major (rows [begin, end) of them);
// w, b, dw_part, db_part: [n]; mean, rstd: [rows]. acc_t, the type of w, b, mean,
// rstd and the partials, is double for f64 input and float otherwise.
#pragma once

#include <cstdint>

namespace ln_ext::cpu {

enum class Elem : int { f32, f64, f16, bf16 };

struct RowKernels {
  const char* isa;
  // y = (x - mean) * rstd * w + b per row; mean and centered variance in two passes.
  void (*fwd)(Elem x_t, Elem y_t, const void* x, const void* w, const void* b, void* y,
              void* mean, void* rstd, int64_t begin, int64_t end, int64_t n, double eps);
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, when dx is not null;
  // dw_part += sum over the rows of dy * xhat and db_part += sum of dy, when not null.
  void (*bwd)(Elem x_t, Elem dy_t, const void* x, const void* dy, const void* w,
              const void* mean, const void* rstd, void* dx, void* dw_part, void* db_part,
              int64_t begin, int64_t end, int64_t n);
};

RowKernels row_kernels_generic();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LN_EXT_CPU_AVX2 1
RowKernels row_kernels_avx2();
#endif

// The best table for this CPU, chosen on first use. LN_EXT_CPU_ISA=generic in the
// environment forces the generic build (tests compare the two).
const RowKernels& row_kernels();

}  // namespace ln_ext::cpu
