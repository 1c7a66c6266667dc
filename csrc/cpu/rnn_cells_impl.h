// The CPU entry points of the LN-RNN cell kernels (rnn_cells_cpu.h), written once
// and compiled by rnn_cells_generic.cpp, rnn_cells_avx2.cpp and rnn_cells_avx512.cpp
// for different ISAs.
// Include it after every other header, inside nothing.
//
// Why the builds cannot mix: everything defined here has internal linkage,
// and the shared row templates are instantiated for `Serial`, a type of this
// file alone, so their instantiations are internal too. What remains shared
// (cell_math.h, c10's conversions) was declared before the AVX2 target was
// switched on, so any out-of-line copy of it is baseline code. `flatten` inlines
// the whole row function, lambdas and float math included, into each entry
// point, where it is compiled (and vectorized) for this file's target.
#ifndef LN_EXT_ISA_NAME
#error "define LN_EXT_ISA_NAME before including rnn_cells_impl.h"
#endif

namespace ln_ext::cpu {
namespace {

struct Serial : cell::SerialRow {};

template <class T, class A>
__attribute__((flatten)) void rnn_fwd(const cell::RnnRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::rnn_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void rnn_bwd(const cell::RnnRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::rnn_bwd_row(Serial{}, rows.at(b, H), H);
}
template <class T, class A>
__attribute__((flatten)) void lstm_fwd(const cell::LstmRow<T, A>& rows, int64_t begin,
                                       int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::lstm_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void lstm_bwd(const cell::LstmRow<T, A>& rows, int64_t begin,
                                       int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::lstm_bwd_row(Serial{}, rows.at(b, H), H);
}
template <class T, class A>
__attribute__((flatten)) void gru_fwd(const cell::GruRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H, A eps) {
  for (int64_t b = begin; b < end; ++b) cell::gru_fwd_row(Serial{}, rows.at(b, H), H, eps);
}
template <class T, class A>
__attribute__((flatten)) void gru_bwd(const cell::GruRow<T, A>& rows, int64_t begin,
                                      int64_t end, int64_t H) {
  for (int64_t b = begin; b < end; ++b) cell::gru_bwd_row(Serial{}, rows.at(b, H), H);
}

// The step GEMM (StepGemm): register tiles of kGemmRows rows x 2 vectors; per k one row of
// the panel is loaded and each row's a[k] broadcast into multiply-adds. Vectors of
// LN_EXT_GEMM_VEC_BYTES (64 in the AVX-512 build: 32 registers hold the 16 accumulators
// of 8 rows; 32 in the AVX2 build and 16 in the generic one, 6 rows: 12 of 16 registers).
#ifndef LN_EXT_GEMM_VEC_BYTES
#define LN_EXT_GEMM_VEC_BYTES 16
#endif
#ifndef LN_EXT_GEMM_ROWS
#define LN_EXT_GEMM_ROWS 6
#endif
typedef float gemm_vec __attribute__((vector_size(LN_EXT_GEMM_VEC_BYTES)));
constexpr int64_t kGemmLanes = LN_EXT_GEMM_VEC_BYTES / sizeof(float);
constexpr int64_t kGemmPanel = 2 * kGemmLanes;
constexpr int kGemmRows = LN_EXT_GEMM_ROWS;

// The k range one set of accumulators sums before adding into c: blocks of kGemmDepth in
// order, each summed from zero, bound the rounding error by the block's length plus the
// block count rather than by K (at K = 1024 a plain k-order sum erred 3.5x MKL's; blocked
// at 128, no more than MKL's, tests/test_rnn.py).
#ifndef LN_EXT_GEMM_DEPTH
#define LN_EXT_GEMM_DEPTH 128
#endif
constexpr int64_t kGemmDepth = LN_EXT_GEMM_DEPTH;

// c[0, panel) = acc, or += acc.
__attribute__((always_inline)) inline void add_to_row(float* c, const gemm_vec (&acc)[2], bool add) {
  gemm_vec t[2] = {acc[0], acc[1]};
  for (int h = 0; h < 2; ++h) {
    if (add) {
      gemm_vec old;
      std::memcpy(&old, c + h * kGemmLanes, sizeof old);
      t[h] += old;
    }
    std::memcpy(c + h * kGemmLanes, &t[h], sizeof t[h]);
  }
}

// Rows [0, R) of a (row stride lda) times one panel, into the first `cols` (<= panel)
// columns of c.
template <int R>
__attribute__((always_inline)) inline void gemm_tile(const float* a, int64_t lda, const float* panel,
                                                     int64_t K, float* c, int64_t ldc, int64_t cols) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
    const int64_t k1 = std::min(K, k0 + kGemmDepth);
    gemm_vec acc[R][2] = {};
    for (int64_t k = k0; k < k1; ++k) {
      gemm_vec b0, b1;
      std::memcpy(&b0, panel + k * kGemmPanel, sizeof b0);
      std::memcpy(&b1, panel + k * kGemmPanel + kGemmLanes, sizeof b1);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float ar = a[r * lda + k];
        acc[r][0] += ar * b0;
        acc[r][1] += ar * b1;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (cols == kGemmPanel) {
        add_to_row(c + r * ldc, acc[r], k0 > 0);
      } else {
        float tile[kGemmPanel] = {};  // the partial panel's columns of c
        if (k0 > 0) std::memcpy(tile, c + r * ldc, cols * sizeof(float));
        add_to_row(tile, acc[r], true);
        std::memcpy(c + r * ldc, tile, cols * sizeof(float));
      }
    }
  }
}

template <int R>
void gemm_tile_rows(int rows, const float* a, int64_t lda, const float* panel, int64_t K, float* c,
                    int64_t ldc, int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R) return gemm_tile_rows<R - 1>(rows, a, lda, panel, K, c, ldc, cols);
  }
  gemm_tile<R>(a, lda, panel, K, c, ldc, cols);
}

void step_gemm(const float* a, int64_t lda, int64_t rows, const float* packed, int64_t K, int64_t p0,
               int64_t p1, float* c, int64_t ldc, int64_t cols) {
  if (K == 0) {  // an empty sum: the tiles would write nothing
    const int64_t j1 = std::min(cols, p1 * kGemmPanel);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = p0 * kGemmPanel; j < j1; ++j) c[r * ldc + j] = 0.0f;
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {  // the panel stays in cache across the row tiles
    const float* panel = packed + p * K * kGemmPanel;
    const int64_t width = std::min(kGemmPanel, cols - p * kGemmPanel);
    for (int64_t r = 0; r < rows; r += kGemmRows) {
      const int n = static_cast<int>(std::min<int64_t>(kGemmRows, rows - r));
      gemm_tile_rows<kGemmRows>(n, a + r * lda, lda, panel, K, c + r * ldc + p * kGemmPanel, ldc, width);
    }
  }
}

template <class T, class A>
CellKernels<T, A> make_cell_kernels() {
  return {&rnn_fwd<T, A>, &rnn_bwd<T, A>, &lstm_fwd<T, A>,
          &lstm_bwd<T, A>, &gru_fwd<T, A>, &gru_bwd<T, A>};
}

CellKernelSet make_cell_kernel_set() {
  return {LN_EXT_ISA_NAME, StepGemm{kGemmPanel, kGemmRows, &step_gemm}, make_cell_kernels<float, float>(), make_cell_kernels<double, double>(),
          make_cell_kernels<c10::Half, float>(), make_cell_kernels<c10::BFloat16, float>()};
}

}  // namespace
}  // namespace ln_ext::cpu
