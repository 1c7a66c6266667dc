// Torch-free LayerNorm row kernels for the CPU, built once per instruction set.
//
// layer_norm_cpu.cpp (the torch side: checks, threads, dtypes) hands each thread a
// range of rows and calls these through a table chosen once per process for the
// CPU it runs on: AVX-512 (64-byte vectors) or AVX2+FMA+F16C on x86-64 when the CPU has
// them, else the generic build (the compiler's baseline ISA). The kernels include no torch
// header, so the AVX builds cannot leak their copies of shared inline functions into the
// generic path.
//
// Shapes: x, residual, h, y, dy, dh, dx: [rows, n] row-major (rows [begin, end) of them);
// w, b (x's dtype, or float32 beside 16-bit x), dw_part, db_part: [n]; mean, rstd: [rows].
// acc_t, the type of mean, rstd and the partials, is double for f64 input and float otherwise.
#pragma once

#include <cstdint>

namespace ln_ext::cpu {

enum class Elem : int { f32, f64, f16, bf16 };

// One forward call of the norm family: LayerNorm (centered) or RMSNorm, of x or, with a
// residual, of h = x + residual (add + norm), which is written out.
struct FwdCall {
  Elem x_t, y_t, h_t;      // h_t: residual and h (x's dtype, or float32 for a 16-bit x)
  Elem p_t;                // w and b: x's dtype, or float32 for a 16-bit x
  bool centered;           // LayerNorm: mean and bias; false: RMSNorm (no mean, no bias)
  const void* x;           // [rows, n]
  const void* residual;    // [rows, n] of h_t, or null: no add
  void* h;                 // [rows, n] of h_t: x + residual (with a residual)
  const void* w;           // [n] of p_t (ones when absent)
  double weight_offset;    // the gain is weight_offset + w
  const void* b;           // [n] of p_t (zeros when absent); unused by RMSNorm
  void* y;                 // [rows, n] of y_t
  void* mean;              // acc_t [rows]; unused by RMSNorm
  void* rstd;              // acc_t [rows]
  int64_t n;
  double eps;
  bool stream_y = false;   // y outgrows the caches: stored around them (AVX2, AVX-512 builds)
};

// One backward call: the gradient of the norm's input (x, or h of add + norm).
struct BwdCall {
  Elem x_t, dy_t, p_t;     // p_t: w's (x's dtype, or float32 for a 16-bit x)
  bool centered;
  const void* x;           // [rows, n]: the norm's input
  const void* dy;          // [rows, n]
  const void* dh;          // [rows, n] of x_t, or null: a gradient of h added to dx
  const void* w;           // [n] of p_t (ones when absent)
  double weight_offset;    // the gain is weight_offset + w
  const void* mean;        // acc_t [rows]; unused by RMSNorm
  const void* rstd;        // acc_t [rows]
  void* dx;                // [rows, n] of x_t, or null: not asked for
  int64_t n;
  bool stream_dx = false;  // as FwdCall::stream_y, for dx
};

struct RowKernels {
  const char* isa;
  // Rows [begin, end) of y = xhat * gain + b (LayerNorm; RMSNorm: xhat * gain), gain =
  // weight_offset + w, statistics in
  // two passes (the corrected two-pass algorithm) or one (RMSNorm's sum of squares).
  void (*fwd)(const FwdCall& call, int64_t begin, int64_t end);
  // Rows [begin, end): dx = rstd / n * (n g - sum(g) - xhat sum(g * xhat)) (+ dh), g = dy *
  // gain, when dx is not null; dw_part += sum over the rows of dy * xhat and db_part += sum
  // of dy (LayerNorm), when dw_part is not null.
  void (*bwd)(const BwdCall& call, void* dw_part, void* db_part, int64_t begin, int64_t end);
};

RowKernels row_kernels_generic();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LN_EXT_CPU_AVX2 1
RowKernels row_kernels_avx2();
RowKernels row_kernels_avx512();
#endif

// Whether this CPU runs the AVX-512 builds (F, BW, DQ and VL).
bool cpu_has_avx512();

// Whether LN_EXT_CPU_ISA in the environment caps the CPU builds at `isa` ("generic",
// "avx2": no AVX-512 build): tests run the builds this CPU would not pick. Every family's
// choice reads it.
bool cpu_isa_capped_at(const char* isa);

// The best table for this CPU, chosen on first use; LN_EXT_CPU_ISA=generic forces the
// generic build.
const RowKernels& row_kernels();

}  // namespace ln_ext::cpu
