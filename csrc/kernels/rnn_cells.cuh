// Fused element-wise LN-RNN cells: one row (one sample of one time step) at a
// time, written once for both devices.
//
// What: everything of a cell step except the W_h h GEMM: the layer norms of the
// recurrent projection (and of c for the LSTM), the sum with the pre-normalized
// input projection and the biases, the gate nonlinearities, the state update
// and the output (forward); and its gradient (backward), which also writes the
// per-row contributions to the parameter gradients so the caller can sum them
// in a fixed order (no atomics).
//
// How work is split: a row function runs on an "executor" that owns one row.
//   - SerialRow (CPU, below): one thread walks every column, each pass one loop
//     over contiguous columns that gcc vectorizes (so no branches and no libm
//     calls in a pass: float32 math from cpu/cell_math.h); sums go through a
//     fixed-order lane buffer. Built twice, generic and AVX2 (cpu/rnn_cells_cpu.h);
//     at::parallel_for spreads rows over threads (cpu/rnn_cpu.cpp).
//   - BlockRow (CUDA, below): one thread block per row; column j belongs to
//     thread j % blockDim.x in every pass, so a thread may read back what it
//     wrote in an earlier pass without a barrier; sums are block reductions.
// Statistics use two passes (mean, then the centered sum of squares) reading
// the row again from memory (L1/L2 on the GPU). All arithmetic is in A
// (float32, or float64 for double T); T is the io dtype.
//
// Assumes contiguous rows; 64-bit row offsets; any H >= 1 (no shared-memory
// row copy, so no size limit). No torch headers: T only needs conversions to
// and from A.
// Measured: the math against float64 references through the CPU executor
// (tests/test_rnn.py). CPU (AMD EPYC, AVX2 build, fp32, B = 16): one op call on
// 1 thread, LSTM H = 128 fwd 16 / bwd 14 us (scalar libm, before: 82 / 118);
// layers fwd+bwd at T = 32 on 2 threads (benchmarks/bench_rnn.py; the RNN by
// the same pattern; a shared machine) against the naive nn composition: LSTM H = 128 4.4-5.7 ms vs 8.7, H = 256 12.3
// vs 19.5; GRU 3.1 vs 8.8, 9.4 vs 17.2; RNN 1.4 vs 2.9, 3.1-4.0 vs 5.2-5.9.
// The CUDA executor is built for sm_90 (ptxas: 21-70 registers, no spills) but
// has not yet run on a GPU; no timings yet.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "norm_math.cuh"

#ifdef LN_EXT_DEVICE_CODE
#include "platform.cuh"
#else
#include <string.h>

#include "cpu/cell_math.h"
#endif

namespace ln_ext {
namespace cell {

using kernels::layer_norm_dx;

#ifdef LN_EXT_DEVICE_CODE
LN_EXT_FN float ftanh(float x) { return tanhf(x); }
LN_EXT_FN float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
#else
// The CPU's column loops vectorize only without libm calls (cpu/cell_math.h).
inline float ftanh(float x) { return cpu_math::tanh(x); }
inline float sigmoid(float x) { return cpu_math::sigmoid(x); }
#endif
LN_EXT_FN double ftanh(double x) { return tanh(x); }
LN_EXT_FN double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// p + n, leaving an absent (null) operand absent.
template <class P>
LN_EXT_FN P* adv(P* p, int64_t n) {
  return p == nullptr ? p : p + n;
}

// Mean and rstd of n values get(j) over the row, in two passes.
template <class A, class Exec, class Get>
LN_EXT_FN void row_mean_rstd(const Exec& ex, int64_t n, A eps, Get get, A& mean, A& rstd) {
  A s[1], q[1];
  ex.sum_cols(n, [&](int64_t j, A* v) { v[0] = get(j); }, s);
  mean = s[0] / A(n);
  ex.sum_cols(n, [&](int64_t j, A* v) {
    const A d = get(j) - mean;
    v[0] = d * d;
  }, q);
  rstd = kernels::inv_sqrt(q[0] / A(n) + eps);
}

// Pointers to one row of every operand of a cell op (unused ones stay null).
// Gates and stats are written by the forward and read by the backward.

// ---------------------------------------------------------------- LN-RNN
template <class T, class A>
struct RnnRow {
  const T *xproj, *hproj, *gamma, *beta, *dh;  // [H] each
  T *h, *da;                                    // [H]
  A *stats;                                     // [2]: mean, rstd of a = xproj + hproj
  A *dgamma_rows, *dbeta_rows;                  // [H]
  bool relu = false;                            // h = relu(LN(a)) (nn.RNN's 'relu'), else tanh

  // The same operands offset to row b.
  LN_EXT_FN RnnRow at(int64_t b, int64_t H) const {
    return {adv(xproj, b * H), adv(hproj, b * H), gamma, beta, adv(dh, b * H),
            adv(h, b * H), adv(da, b * H), adv(stats, b * 2),
            adv(dgamma_rows, b * H), adv(dbeta_rows, b * H), relu};
  }
};

// max(v, 0), NaN kept (as torch.relu).
template <class A>
LN_EXT_FN A relu_of(A v) {
  return v < A(0) ? A(0) : v;
}

template <class T, class A, class Exec>
LN_EXT_FN void rnn_fwd_row(const Exec& ex, const RnnRow<T, A>& r, int64_t H, A eps) {
  auto a = [&](int64_t j) { return A(r.xproj[j]) + A(r.hproj[j]); };
  A mean, rstd;
  row_mean_rstd(ex, H, eps, a, mean, rstd);
  auto ln = [&](int64_t j) { return A(r.gamma[j]) * (a(j) - mean) * rstd + A(r.beta[j]); };
  if (r.relu) {  // one loop per activation: each stays a plain vectorizable loop
    ex.for_cols(H, [&](int64_t j) { r.h[j] = T(relu_of(ln(j))); });
  } else {
    ex.for_cols(H, [&](int64_t j) { r.h[j] = T(ftanh(ln(j))); });
  }
  if (ex.leader()) {
    r.stats[0] = mean;
    r.stats[1] = rstd;
  }
}

template <class T, class A, class Exec>
LN_EXT_FN void rnn_bwd_row(const Exec& ex, const RnnRow<T, A>& r, int64_t H) {
  const A mean = r.stats[0], rstd = r.stats[1];
  auto ahat = [&](int64_t j) { return (A(r.xproj[j]) + A(r.hproj[j]) - mean) * rstd; };
  // dy: gradient at the LN output (= the beta row); d(ahat) = dy * gamma.
  A s[2];
  const auto sums = [&](auto activation_backward) {  // (dh, ln output) -> gradient at the ln output
    ex.sum_cols(H, [&](int64_t j, A* v) {
      const A xh = ahat(j);
      const A dy = activation_backward(A(r.dh[j]), A(r.gamma[j]) * xh + A(r.beta[j]));
      const A g = dy * A(r.gamma[j]);
      v[0] = g;
      v[1] = g * xh;
      r.dgamma_rows[j] = dy * xh;
      r.dbeta_rows[j] = dy;
    }, s);
  };
  if (r.relu) {
    // torch's threshold_backward: 0 where the output is <= 0, else dh as it is (a NaN z
    // passes dh; an inf or NaN dh of a masked column gives 0, not 0 * inf).
    sums([](A dh, A z) { return z <= A(0) ? A(0) : dh; });
  } else {
    sums([](A dh, A z) {
      const A y = ftanh(z);
      return dh * (A(1) - y * y);
    });
  }
  const A rstd_n = rstd / A(H);
  ex.for_cols(H, [&](int64_t j) {  // reads back this thread's own dbeta_rows[j]
    r.da[j] = T(layer_norm_dx(r.dbeta_rows[j] * A(r.gamma[j]), ahat(j), A(H), s[0], s[1], rstd_n));
  });
}

// ---------------------------------------------------------------- LN-LSTM
template <class T, class A>
struct LstmRow {
  const T *xgates, *hproj, *gamma_h, *bias;     // [4H]
  const T *c_prev, *gamma_c, *beta_c, *dh, *dc;  // [H]
  T *h, *c, *dc_prev;                            // [H]
  T *dgates, *dhproj;                            // [4H]
  A *gates;                                      // [4H]: s(i), s(f), tanh(g), s(o)
  A *stats;                                      // [4]: mean/rstd of hproj, mean/rstd of c
  A *dgamma_h_rows;                              // [4H]
  A *dgamma_c_rows, *dbeta_c_rows;               // [H]

  LN_EXT_FN LstmRow at(int64_t b, int64_t H) const {
    const int64_t n = b * H, n4 = 4 * n;
    return {adv(xgates, n4), adv(hproj, n4), gamma_h, bias,
            adv(c_prev, n), gamma_c, beta_c, adv(dh, n), adv(dc, n),
            adv(h, n), adv(c, n), adv(dc_prev, n),
            adv(dgates, n4), adv(dhproj, n4),
            adv(gates, n4), adv(stats, b * 4), adv(dgamma_h_rows, n4),
            adv(dgamma_c_rows, n), adv(dbeta_c_rows, n)};
  }
};

template <class T, class A, class Exec>
LN_EXT_FN void lstm_fwd_row(const Exec& ex, const LstmRow<T, A>& r, int64_t H, A eps) {
  A mh, rh;
  ex.mean_rstd(r.hproj, 4 * H, eps, mh, rh);
  ex.for_cols(H, [&](int64_t j) {
    auto pre = [&](int k) {
      const int64_t q = k * H + j;
      return A(r.xgates[q]) + A(r.gamma_h[q]) * (A(r.hproj[q]) - mh) * rh + A(r.bias[q]);
    };
    // Written out rather than a loop over k with a tanh-or-sigmoid choice, which
    // gcc leaves as a branch (and then does not vectorize).
    const A i = sigmoid(pre(0)), f = sigmoid(pre(1)), g = ftanh(pre(2)), o = sigmoid(pre(3));
    r.gates[j] = i;
    r.gates[H + j] = f;
    r.gates[2 * H + j] = g;
    r.gates[3 * H + j] = o;
    // The carried state is rounded to T before LN(c) sees it, so that the
    // backward, which reads c back as T, recomputes exactly these statistics.
    r.c[j] = T(f * A(r.c_prev[j]) + i * g);
  });
  A mc, rc;  // each thread reads back its own c[j]
  ex.mean_rstd(r.c, H, eps, mc, rc);
  ex.for_cols(H, [&](int64_t j) {
    const A chat = (A(r.c[j]) - mc) * rc;
    r.h[j] = T(r.gates[3 * H + j] * ftanh(A(r.gamma_c[j]) * chat + A(r.beta_c[j])));
  });
  if (ex.leader()) {
    r.stats[0] = mh;
    r.stats[1] = rh;
    r.stats[2] = mc;
    r.stats[3] = rc;
  }
}

// Whether a gradient written to T and read back is exactly the A value computed
// (float32 or float64 io): the backward then computes each gate gradient once.
template <class T, class A>
constexpr bool kExactReadBack = std::is_same<T, A>::value;

// The gradient at o's pre-activation: dh * tanh(LN(c)) * o (1 - o), tc = tanh(LN(c)).
template <class A>
LN_EXT_FN A lstm_o_grad(A dh, A tc, A o) {
  return dh * tc * o * (A(1) - o);
}

// Gradients at column j of the pre-activations (i, f, g, o) and of c_prev,
// given the statistics of c (mc, rc; rc_n = rc / H) and the sums of the c-LN
// backward (sum_g, sum_gx: over H). o's is pass 1's, read back, where that is exact.
template <class T, class A>
LN_EXT_FN void lstm_column_grads(const LstmRow<T, A>& r, int64_t H, int64_t j, A mc, A rc, A rc_n,
                                 A sum_g, A sum_gx, A dpre[4], A& dc_prev) {
  const A i = r.gates[j], f = r.gates[H + j], g = r.gates[2 * H + j], o = r.gates[3 * H + j];
  const A chat = (A(r.c[j]) - mc) * rc;
  // The c-LN's g from pass 1's dbeta_c_rows (this column's own): the same rounded
  // product that sum_g added, so that layer_norm_dx cancels exactly at H = 1.
  const A dchat = r.dbeta_c_rows[j] * A(r.gamma_c[j]);
  const A dc = A(r.dc[j]) + layer_norm_dx(dchat, chat, A(H), sum_g, sum_gx, rc_n);
  dpre[0] = dc * g * i * (A(1) - i);
  dpre[1] = dc * A(r.c_prev[j]) * f * (A(1) - f);
  dpre[2] = dc * i * (A(1) - g * g);
  if constexpr (kExactReadBack<T, A>) {
    dpre[3] = A(r.dgates[3 * H + j]);
  } else {
    dpre[3] = lstm_o_grad(A(r.dh[j]), ftanh(A(r.gamma_c[j]) * chat + A(r.beta_c[j])), o);
  }
  dc_prev = dc * f;
}

template <class T, class A, class Exec>
LN_EXT_FN void lstm_bwd_row(const Exec& ex, const LstmRow<T, A>& r, int64_t H) {
  const A mh = r.stats[0], rh = r.stats[1], mc = r.stats[2], rc = r.stats[3];
  // Pass 1: backward of h = o * tanh(LN(c)) up to d(chat); sums for the c-LN.
  A s[2];
  ex.sum_cols(H, [&](int64_t j, A* v) {
    const A chat = (A(r.c[j]) - mc) * rc;
    const A tc = ftanh(A(r.gamma_c[j]) * chat + A(r.beta_c[j]));
    const A dlnc = A(r.dh[j]) * r.gates[3 * H + j] * (A(1) - tc * tc);
    if constexpr (kExactReadBack<T, A>) r.dgates[3 * H + j] = lstm_o_grad(A(r.dh[j]), tc, r.gates[3 * H + j]);
    const A g = dlnc * A(r.gamma_c[j]);
    v[0] = g;
    v[1] = g * chat;
    r.dgamma_c_rows[j] = dlnc * chat;
    r.dbeta_c_rows[j] = dlnc;
  }, s);
  const A rc_n = rc / A(H);
  // Pass 2: gate gradients, dc_prev, sums for the hproj-LN over 4H (a column's
  // four gates summed first).
  A sh[2];
  ex.sum_cols(H, [&](int64_t j, A* v) {
    A dpre[4], dcp;
    lstm_column_grads(r, H, j, mc, rc, rc_n, s[0], s[1], dpre, dcp);
    r.dc_prev[j] = T(dcp);
    A s_g = 0, s_gx = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      const A hhat = (A(r.hproj[q]) - mh) * rh;
      const A g = dpre[k] * A(r.gamma_h[q]);
      s_g += g;
      s_gx += g * hhat;
      r.dgates[q] = T(dpre[k]);
      r.dgamma_h_rows[q] = dpre[k] * hhat;
    }
    v[0] = s_g;
    v[1] = s_gx;
  }, sh);
  const A rh_n = rh / A(4 * H);
  // Pass 3: d(hproj) through its LN; the gate gradients are pass 2's, read back
  // where that is exact, else recomputed in A rather than read back rounded to T.
  ex.for_cols(H, [&](int64_t j) {
    A dpre[4], dcp;
    if constexpr (kExactReadBack<T, A>) {
      for (int k = 0; k < 4; ++k) dpre[k] = A(r.dgates[k * H + j]);
    } else {
      lstm_column_grads(r, H, j, mc, rc, rc_n, s[0], s[1], dpre, dcp);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      const A hhat = (A(r.hproj[q]) - mh) * rh;
      r.dhproj[q] = T(layer_norm_dx(dpre[k] * A(r.gamma_h[q]), hhat, A(4 * H), sh[0], sh[1], rh_n));
    }
  });
}

// ---------------------------------------------------------------- LN-GRU
template <class T, class A>
struct GruRow {
  const T *xzr;                          // [2H]
  const T *xn, *h_prev, *dh;             // [H]
  const T *hproj, *gamma_h, *beta_h;     // [3H]
  T *h, *dxn, *dh_prev;                  // [H]
  T *dxzr;                               // [2H]
  T *dhproj;                             // [3H]
  A *gates;                              // [4H]: z, r, n, hn
  A *stats;                              // [4]: mean/rstd of hproj[:2H], of hproj[2H:]
  A *dgamma_h_rows, *dbeta_h_rows;       // [3H]

  LN_EXT_FN GruRow at(int64_t b, int64_t H) const {
    const int64_t n = b * H;
    return {adv(xzr, 2 * n), adv(xn, n), adv(h_prev, n), adv(dh, n),
            adv(hproj, 3 * n), gamma_h, beta_h,
            adv(h, n), adv(dxn, n), adv(dh_prev, n), adv(dxzr, 2 * n), adv(dhproj, 3 * n),
            adv(gates, 4 * n), adv(stats, b * 4), adv(dgamma_h_rows, 3 * n), adv(dbeta_h_rows, 3 * n)};
  }
};

template <class T, class A, class Exec>
LN_EXT_FN void gru_fwd_row(const Exec& ex, const GruRow<T, A>& r, int64_t H, A eps) {
  // The two LN groups share each pass: zr over 2H (columns j and H + j), n over H.
  A s[2], q[2];
  ex.sum_cols(H, [&](int64_t j, A* v) {
    v[0] = A(r.hproj[j]) + A(r.hproj[H + j]);
    v[1] = A(r.hproj[2 * H + j]);
  }, s);
  const A m_zr = s[0] / A(2 * H), m_n = s[1] / A(H);
  ex.sum_cols(H, [&](int64_t j, A* v) {
    const A dz = A(r.hproj[j]) - m_zr, dr = A(r.hproj[H + j]) - m_zr;
    const A dn = A(r.hproj[2 * H + j]) - m_n;
    v[0] = dz * dz + dr * dr;
    v[1] = dn * dn;
  }, q);
  const A rs_zr = kernels::inv_sqrt(q[0] / A(2 * H) + eps), rs_n = kernels::inv_sqrt(q[1] / A(H) + eps);
  ex.for_cols(H, [&](int64_t j) {
    auto ln = [&](int64_t q, A m, A rs) {
      return A(r.gamma_h[q]) * (A(r.hproj[q]) - m) * rs + A(r.beta_h[q]);
    };
    const A z = sigmoid(A(r.xzr[j]) + ln(j, m_zr, rs_zr));
    const A rg = sigmoid(A(r.xzr[H + j]) + ln(H + j, m_zr, rs_zr));
    const A hn = ln(2 * H + j, m_n, rs_n);
    const A n = ftanh(A(r.xn[j]) + rg * hn);
    r.h[j] = T((A(1) - z) * A(r.h_prev[j]) + z * n);
    r.gates[j] = z;
    r.gates[H + j] = rg;
    r.gates[2 * H + j] = n;
    r.gates[3 * H + j] = hn;
  });
  if (ex.leader()) {
    r.stats[0] = m_zr;
    r.stats[1] = rs_zr;
    r.stats[2] = m_n;
    r.stats[3] = rs_n;
  }
}

template <class T, class A, class Exec>
LN_EXT_FN void gru_bwd_row(const Exec& ex, const GruRow<T, A>& r, int64_t H) {
  const A m_zr = r.stats[0], rs_zr = r.stats[1], m_n = r.stats[2], rs_n = r.stats[3];
  // Gate k's column j, normalized (k = 0, 1: the zr group; k = 2: n).
  auto hhat = [&](int k, int64_t j) {
    const A m = k < 2 ? m_zr : m_n, rs = k < 2 ? rs_zr : rs_n;
    return (A(r.hproj[k * H + j]) - m) * rs;
  };
  // Pass 1: gradients at the three LN outputs (dy = the beta rows) and the
  // LN-backward sums of each group: zr's (the two gates summed first), then n's.
  A s[4];
  ex.sum_cols(H, [&](int64_t j, A* v) {
    const A z = r.gates[j], rg = r.gates[H + j], n = r.gates[2 * H + j], hn = r.gates[3 * H + j];
    const A dh = A(r.dh[j]), hp = A(r.h_prev[j]);
    const A dn_pre = dh * z * (A(1) - n * n);
    const A dy[3] = {dh * (n - hp) * z * (A(1) - z),    // z pre-activation
                     dn_pre * hn * rg * (A(1) - rg),    // r pre-activation
                     dn_pre * rg};                      // LN output hn
    r.dxzr[j] = T(dy[0]);
    r.dxzr[H + j] = T(dy[1]);
    r.dxn[j] = T(dn_pre);
    r.dh_prev[j] = T(dh * (A(1) - z));
    A g[3], gx[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int64_t q = k * H + j;
      const A xh = hhat(k, j);
      g[k] = dy[k] * A(r.gamma_h[q]);
      gx[k] = g[k] * xh;
      r.dgamma_h_rows[q] = dy[k] * xh;
      r.dbeta_h_rows[q] = dy[k];
    }
    v[0] = g[0] + g[1];
    v[1] = gx[0] + gx[1];
    v[2] = g[2];
    v[3] = gx[2];
  }, s);
  const A rs_zr_n = rs_zr / A(2 * H), rs_n_n = rs_n / A(H);
  // Pass 2: d(hproj) through each group's LN (reads back own dbeta_h_rows).
  ex.for_cols(H, [&](int64_t j) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int64_t q = k * H + j;
      const bool zr = k < 2;
      r.dhproj[q] = T(layer_norm_dx(r.dbeta_h_rows[q] * A(r.gamma_h[q]), hhat(k, j), A(zr ? 2 * H : H),
                                    zr ? s[0] : s[2], zr ? s[1] : s[3], zr ? rs_zr_n : rs_n_n));
    }
  });
}

// ---------------------------------------------------------------- executors

#ifndef LN_EXT_DEVICE_CODE
// The loop's iterations are independent (not `omp simd`: gcc 12 then fails to
// vectorize the sum passes, whose per-column v[N] it turns into lane arrays).
#if defined(__clang__)
#define LN_EXT_SIMD_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define LN_EXT_SIMD_LOOP _Pragma("GCC ivdep")
#else
#define LN_EXT_SIMD_LOOP
#endif

// CPU: the calling thread owns the whole row. Each pass is a loop over
// contiguous columns that the compiler vectorizes (the columns of one pass never
// depend on each other, which LN_EXT_SIMD_LOOP asserts). A sum pass writes its
// per-column values to a stack buffer, kChunk columns at a time, and adds them
// into kLanes partial sums by column index modulo kLanes, then a fixed tree: the
// order depends on n alone, not on the vector width, alignment or thread count.
struct SerialRow {
  static constexpr int kChunk = 256, kLanes = 8;

  template <class F>
  inline void for_cols(int64_t n, F f) const {
    LN_EXT_SIMD_LOOP
    for (int64_t j = 0; j < n; ++j) f(j);
  }

  // s[k] = the sum over j < n of the v[k] that f(j, v) writes, k < N.
  template <int N, class A, class F>
  inline void sum_cols(int64_t n, F f, A (&s)[N]) const {
    A lane[N][kLanes] = {};
    alignas(64) A buf[N][kChunk];
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t m = n - j0 < kChunk ? n - j0 : kChunk;
      LN_EXT_SIMD_LOOP
      for (int64_t c = 0; c < m; ++c) {
        A v[N];
        f(j0 + c, v);
        for (int k = 0; k < N; ++k) buf[k][c] = v[k];
      }
      const int64_t padded = (m + kLanes - 1) / kLanes * kLanes;
      for (int k = 0; k < N; ++k) {
        for (int64_t c = m; c < padded; ++c) buf[k][c] = A(0);
        for (int64_t c = 0; c < padded; c += kLanes) {
          for (int l = 0; l < kLanes; ++l) lane[k][l] += buf[k][c + l];
        }
      }
    }
    for (int k = 0; k < N; ++k) {
      const A* l = lane[k];
      s[k] = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    }
  }

  // Mean and rstd of a contiguous row x[0, n) (row_mean_rstd's two passes). For float, the
  // sums in registers: 4 x 8 lanes, element j in accumulator (j / 8) % 4, lane j % 8,
  // then a fixed tree; the lane buffer of sum_cols cost a store and a load per element
  // (LSTM forward cell, AVX-512 build, B = 256, H = 128, 1 thread: 5.8 -> 5.1 ns a column).
  template <class T, class A>
  inline void mean_rstd(const T* x, int64_t n, A eps, A& mean, A& rstd) const {
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      mean = sum_of<false>(x, n, 0.0f) / float(n);
      rstd = kernels::inv_sqrt(sum_of<true>(x, n, mean) / float(n) + eps);
    } else {
      row_mean_rstd(*this, n, eps, [&](int64_t j) { return A(x[j]); }, mean, rstd);
    }
  }

  inline bool leader() const { return true; }

 private:
  typedef float lanes8 __attribute__((vector_size(32)));  // never passed or returned by value
  // acc += x[0, 8) or its squared deviations from center.
  template <bool kSquares>
  static inline void add8(lanes8& acc, const float* x, float center) {
    lanes8 v;
    memcpy(&v, x, sizeof v);
    if constexpr (kSquares) {
      v -= center;
      v *= v;
    }
    acc += v;
  }
  // The sum over x[0, n) of x, or of (x - center)^2.
  template <bool kSquares>
  static inline float sum_of(const float* x, int64_t n, float center) {
    lanes8 acc[4] = {};
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) add8<kSquares>(acc[u], x + j + 8 * u, center);
    }
    for (; j + 8 <= n; j += 8) add8<kSquares>(acc[(j / 8) % 4], x + j, center);
    if (j < n) {  // the last n % 8 elements, padded with center (adding 0 in either sum)
      float tail[8];
      for (int l = 0; l < 8; ++l) tail[l] = j + l < n ? x[j + l] : (kSquares ? center : 0.0f);
      add8<kSquares>(acc[(j / 8) % 4], tail, center);
    }
    const lanes8 l = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
  }
};
#endif  // !LN_EXT_DEVICE_CODE

#ifdef LN_EXT_DEVICE_CODE
// CUDA: the thread block owns the row; blockDim.x is a multiple of 32, <= 1024.
// `scratch`: kScratch values of shared memory, declared by the kernel.
template <class A>
struct BlockRow {
  static constexpr int kScratch = 64;
  A* scratch;

  template <class F>
  __device__ __forceinline__ void for_cols(int64_t n, F f) const {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j);
  }
  template <class T>
  __device__ __forceinline__ void mean_rstd(const T* x, int64_t n, A eps, A& mean, A& rstd) const {
    row_mean_rstd(*this, n, eps, [&](int64_t j) { return A(x[j]); }, mean, rstd);
  }
  // s[k] = the sum over j < n of the v[k] that f(j, v) writes: per thread in
  // column order, then over the block.
  template <int N, class F>
  __device__ __forceinline__ void sum_cols(int64_t n, F f, A (&s)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) s[k] = A(0);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      A v[N];
      f(j, v);
#pragma unroll
      for (int k = 0; k < N; ++k) s[k] += v[k];
    }
    A unused = 0, *p = s;  // through p: no s[N] even in the dead arm below
#pragma unroll
    for (int k = 0; k < N; k += 2) sum2(p[k], k + 1 < N ? p[k + 1] : unused);
  }
  // Replaces a and b by their sums over the block (a fixed-order tree).
  __device__ __forceinline__ void sum2(A& a, A& b) const {
    A* const partial[2] = {scratch, scratch + 32};
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
      partial[0][warp] = a;
      partial[1][warp] = b;
    }
    __syncthreads();
    a = lane < warps ? partial[0][lane] : A(0);
    b = lane < warps ? partial[1][lane] : A(0);
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
    __syncthreads();  // partial may be reused by the next call
  }
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
};

// One block per row: blockIdx.x is the row.
template <class T, class A>
__global__ void rnn_fwd_kernel(RnnRow<T, A> r, int64_t H, A eps) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  rnn_fwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void rnn_bwd_kernel(RnnRow<T, A> r, int64_t H) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  rnn_bwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H);
}
template <class T, class A>
__global__ void lstm_fwd_kernel(LstmRow<T, A> r, int64_t H, A eps) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  lstm_fwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void lstm_bwd_kernel(LstmRow<T, A> r, int64_t H) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  lstm_bwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H);
}
template <class T, class A>
__global__ void gru_fwd_kernel(GruRow<T, A> r, int64_t H, A eps) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  gru_fwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void gru_bwd_kernel(GruRow<T, A> r, int64_t H) {
  LN_EXT_SHARED(A, scratch, [BlockRow<A>::kScratch]);
  gru_bwd_row(BlockRow<A>{scratch}, r.at(blockIdx.x, H), H);
}
#endif  // LN_EXT_DEVICE_CODE

}  // namespace cell
}  // namespace ln_ext
