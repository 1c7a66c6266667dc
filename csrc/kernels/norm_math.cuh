// The arithmetic every layer norm of ln_ext shares (the CUDA LayerNorm kernels and the
// LN-RNN cells, on both devices), written once so that its rounding is the same
// everywhere. Knows nothing of torch or of how work is split.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define LN_EXT_FN __host__ __device__ __forceinline__
#else
#define LN_EXT_FN inline
#endif

// Code written for the GPU: compiled by nvcc, or run on the CPU by the host emulation
// (scripts/kernel_check), as opposed to the CPU kernels' code paths.
#if defined(__CUDACC__) || defined(LN_EXT_HOST_EMULATION)
#define LN_EXT_DEVICE_CODE 1
#endif

namespace ln_ext {
namespace kernels {

// Correctly rounded (IEEE) 1 / sqrt(v): nvcc's default -prec-div/-prec-sqrt, the same
// expression as the CPU kernels', never the rsqrt approximation.
LN_EXT_FN float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
LN_EXT_FN double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// A row's statistics from the corrected two-pass algorithm: `shift` is the mean of a
// first pass, `residual` the mean of d = x - shift over a second, `rstd` from the sum
// of squared deviations corrected by it. x - shift is exact for the elements near a
// mean that is large next to the spread (Sterbenz), so the rounding of the first
// mean, which a plain two-pass LayerNorm turns into a shift of every xhat, is repaired
// by `residual`: xhat = ((x - shift) - residual) * rstd.
template <typename A>
struct RowStats {
  A shift, residual, rstd;
  LN_EXT_FN A mean() const { return shift + residual; }
  LN_EXT_FN A xhat(A x) const { return ((x - shift) - residual) * rstd; }
};

// The statistics of n values whose first-pass mean is `shift`, from sum_d = sum(x - shift)
// and sum_dd = sum((x - shift)^2).
template <typename A>
LN_EXT_FN RowStats<A> corrected_stats(A shift, A sum_d, A sum_dd, A n, A eps) {
  const A residual = sum_d / n;
  A m2 = sum_dd - sum_d * residual;
  m2 = m2 > A(0) ? m2 : A(0);
  return {shift, residual, inv_sqrt(m2 / n + eps)};
}

// The input gradient of a layer norm over n values at one of them, from g = dy * gain,
// its xhat, sum(g) and sum(g * xhat) over the row and rstd / n:
//   rstd * (g - mean(g) - xhat * mean(g * xhat)) = rstd / n * (n g - sum(g) - xhat sum(g xhat)).
// Written with n g so that g feeds a multiply: compilers (gcc, nvcc) contract
// `dy * gain - mean(g)` into a fused multiply-add of the exact product, while sum(g) was
// added from rounded products, and for n = 1 (xhat = 0, the gradient is exactly 0) that
// left the product's rounding error times rstd = 1 / sqrt(eps). A product that is
// multiplied again is never fused into the subtraction, so n g - sum(g) cancels exactly
// where the math does.
template <typename A>
LN_EXT_FN A layer_norm_dx(A g, A xhat, A n, A sum_g, A sum_gx, A rstd_n) {
  return rstd_n * (g * n - sum_g - xhat * sum_gx);
}

}  // namespace kernels
}  // namespace ln_ext
