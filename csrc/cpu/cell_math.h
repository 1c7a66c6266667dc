// Branch-free float32 exp, sigmoid and tanh for the CPU cell kernels
// (kernels/rnn_cells.cuh; CUDA keeps expf/tanhf there).
//
// Why: libm's expf/tanhf are calls, one element at a time; these are plain
// arithmetic, selects and bit casts, so gcc vectorizes the column loops that use
// them (4 lanes in the baseline x86-64 build, 8 with FMA in the AVX2 build).
// Accuracy against float64, checked once over all 2^32 float32 inputs (generic /
// AVX2+FMA build): exp 1.22 / 0.94 ulp, sigmoid 2.40 / 2.40, tanh 1.52 / 1.59;
// tests/test_rnn.py::test_cpu_cell_math_matches_float64 keeps a wide sweep. Large
// |x|: exp gives 0 or +inf, sigmoid 0 or 1 (subnormals kept), tanh +-1, never NaN.
// NaN in, NaN out.
#pragma once

#include <stdint.h>
#include <string.h>

namespace ln_ext {
namespace cpu_math {

inline uint32_t bits_of(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
inline float float_of(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// c ? a : b through the bits. A plain ?: whose operands feed float arithmetic
// can become a branch (gcc moves the arithmetic into the arms; with trapping math
// it may not then merge them back), and a branch stops the loop's vectorization.
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
}

inline float exp(float x) {
  // Outside [-104, 89] exp(x) rounds to 0 or overflows to +inf anyway; the bounds
  // keep the exponent arithmetic below in range. A comparison with NaN is false,
  // so NaN passes through (and stays NaN to the end).
  x = select(x < -104.0f, -104.0f, x);
  x = select(x > 89.0f, 89.0f, x);
  // x = n ln2 + r with n = round(x / ln2): adding 1.5 * 2^23 rounds x / ln2 to an
  // integer, which the low mantissa bits of t then hold.
  const float shift = 12582912.0f;
  const float t = x * 1.44269502f + shift;
  const float n = t - shift;
  // ln2 in two parts: n * 0x1.62e4p-1 is exact for |n| <= 151, so |r| <= ln2 / 2
  // is found without cancellation error.
  const float r = (x - n * 0.693145751953125f) - n * 1.42860677e-6f;
  // exp(r), |r| <= 0.35: the Taylor series to r^7 (truncation below 2e-9 relative).
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n as 2^(n >> 1) * 2^(n - (n >> 1)): both factors are normal floats for n in
  // [-151, 129], so the result is rounded once, to a subnormal or +inf where the
  // true exp(x) is. Unsigned arithmetic: for NaN, n is garbage but defined.
  const uint32_t ni = bits_of(t) - bits_of(shift);
  const uint32_t n1 = static_cast<uint32_t>(static_cast<int32_t>(ni) >> 1), n2 = ni - n1;
  return p * float_of((n1 + 127u) << 23) * float_of((n2 + 127u) << 23);
}

// 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below: e^-|x| never overflows, so
// sigmoid keeps its subnormal values for x < -87 instead of dropping to 0.
inline float sigmoid(float x) {
  const float e = exp(-__builtin_fabsf(x));
  return select(x >= 0.0f, 1.0f, e) / (1.0f + e);
}

inline float tanh(float x) {
  const float a = __builtin_fabsf(x);
  // |x| < 0.55: the odd Taylor series through x^17 (truncation below 1e-8 relative).
  const float s = a * a;
  float p = 5.90027441e-4f;  // 6404582 / 10854718875
  p = p * s - 1.45583439e-3f;  // -929569 / 638512875
  p = p * s + 3.59212804e-3f;  // 21844 / 6081075
  p = p * s - 8.86323553e-3f;  // -1382 / 155925
  p = p * s + 2.18694885e-2f;  // 62 / 2835
  p = p * s - 5.39682540e-2f;  // -17 / 315
  p = p * s + 1.33333333e-1f;  // 2 / 15
  p = p * s - 3.33333333e-1f;  // -1 / 3
  const float small = a + a * s * p;
  // Else 1 - 2 / (e^2|x| + 1): no cancellation once tanh >= 0.5; e = +inf gives 1.
  const float large = 1.0f - 2.0f / (exp(2.0f * a) + 1.0f);
  return __builtin_copysignf(select(a < 0.55f, small, large), x);
}

}  // namespace cpu_math
}  // namespace ln_ext
