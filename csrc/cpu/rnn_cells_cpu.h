// The LN-RNN cell kernels for the CPU, built once per instruction set.
//
// rnn_cpu.cpp (the torch side: dtypes, threads) hands each thread a range of batch
// rows and calls these through a table chosen once per process: the build of the ISA
// the LayerNorm row kernels (row_kernels.h) were picked for (AVX-512, AVX2 or generic).
// Every build runs the row functions shared with CUDA (kernels/rnn_cells.cuh) on the
// SerialRow executor; rnn_cells_impl.h says how the builds are kept from sharing code.
//
// Row structs point at row 0 of each operand; a kernel runs rows [begin, end).
#pragma once

#include "cpu/row_kernels.h"
#include "kernels/rnn_cells.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ln_ext::cpu {

template <class T, class A>
struct CellKernels {
  void (*rnn_fwd)(const cell::RnnRow<T, A>& rows, int64_t begin, int64_t end, int64_t H, A eps);
  void (*rnn_bwd)(const cell::RnnRow<T, A>& rows, int64_t begin, int64_t end, int64_t H);
  void (*lstm_fwd)(const cell::LstmRow<T, A>& rows, int64_t begin, int64_t end, int64_t H, A eps);
  void (*lstm_bwd)(const cell::LstmRow<T, A>& rows, int64_t begin, int64_t end, int64_t H);
  void (*gru_fwd)(const cell::GruRow<T, A>& rows, int64_t begin, int64_t end, int64_t H, A eps);
  void (*gru_bwd)(const cell::GruRow<T, A>& rows, int64_t begin, int64_t end, int64_t H);
};

// The fused LSTM time loop's step GEMM (float32): c[rows, cols] = a[rows, K] b, where b
// [K, cols] is packed in panels of `panel` columns, [panels][K][panel] with the last one
// zero-padded. A call runs panels [p0, p1) (columns p0 * panel .. min(cols, p1 * panel))
// for every row; each output is summed by one register tile in the same order (blocks of
// k in order) whatever the split, so the result does not depend on the thread count.
struct StepGemm {
  int64_t panel;
  int64_t tile_rows;  // rows of its register tile
  void (*run)(const float* a, int64_t lda, int64_t rows, const float* packed, int64_t K,
              int64_t p0, int64_t p1, float* c, int64_t ldc, int64_t cols);
};

// One build's kernels for every io dtype T (A: float32, float64 for double T).
struct CellKernelSet {
  const char* isa;
  StepGemm gemm_f32;
  CellKernels<float, float> f32;
  CellKernels<double, double> f64;
  CellKernels<c10::Half, float> f16;
  CellKernels<c10::BFloat16, float> bf16;

  template <class T>
  const auto& get() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else if constexpr (std::is_same_v<T, double>) return f64;
    else if constexpr (std::is_same_v<T, c10::Half>) return f16;
    else return bf16;
  }
};

CellKernelSet cell_kernels_generic();
#ifdef LN_EXT_CPU_AVX2
CellKernelSet cell_kernels_avx2();
CellKernelSet cell_kernels_avx512();
#endif

// The build for this CPU: the one row_kernels() chose.
const CellKernelSet& cell_kernels();

}  // namespace ln_ext::cpu
