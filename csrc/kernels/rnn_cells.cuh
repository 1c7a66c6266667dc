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
//   - SerialRow (CPU): one thread walks every column; at::parallel_for spreads
//     rows over threads (csrc/cpu/rnn_cpu.cpp).
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
// (tests/test_rnn.py). The CUDA executor is built for sm_90 (ptxas: 21-70
// registers, no spills) but has not yet run on a GPU; no timings yet.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define LN_EXT_FN __device__ __forceinline__
#else
#define LN_EXT_FN inline
#endif

namespace ln_ext {
namespace cell {

LN_EXT_FN float fexp(float x) { return expf(x); }
LN_EXT_FN double fexp(double x) { return exp(x); }
LN_EXT_FN float ftanh(float x) { return tanhf(x); }
LN_EXT_FN double ftanh(double x) { return tanh(x); }
LN_EXT_FN float frsqrt(float x) { return 1.0f / sqrtf(x); }
LN_EXT_FN double frsqrt(double x) { return 1.0 / sqrt(x); }

// p + n, leaving an absent (null) operand absent.
template <class P>
LN_EXT_FN P* adv(P* p, int64_t n) {
  return p == nullptr ? p : p + n;
}

template <class A>
LN_EXT_FN A sigmoid(A x) {
  return A(1) / (A(1) + fexp(-x));
}

// Mean and rstd of n values get(j) over the row, in two passes.
template <class A, class Exec, class Get>
LN_EXT_FN void row_mean_rstd(const Exec& ex, int64_t n, A eps, Get get, A& mean, A& rstd) {
  A s = 0, unused = 0;
  ex.for_cols(n, [&](int64_t j) { s += get(j); });
  ex.sum2(s, unused);
  mean = s / A(n);
  A q = 0;
  unused = 0;
  ex.for_cols(n, [&](int64_t j) {
    const A d = get(j) - mean;
    q += d * d;
  });
  ex.sum2(q, unused);
  rstd = frsqrt(q / A(n) + eps);
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

  // The same operands offset to row b.
  LN_EXT_FN RnnRow at(int64_t b, int64_t H) const {
    return {adv(xproj, b * H), adv(hproj, b * H), gamma, beta, adv(dh, b * H),
            adv(h, b * H), adv(da, b * H), adv(stats, b * 2),
            adv(dgamma_rows, b * H), adv(dbeta_rows, b * H)};
  }
};

template <class T, class A, class Exec>
LN_EXT_FN void rnn_fwd_row(const Exec& ex, const RnnRow<T, A>& r, int64_t H, A eps) {
  auto a = [&](int64_t j) { return A(r.xproj[j]) + A(r.hproj[j]); };
  A mean, rstd;
  row_mean_rstd(ex, H, eps, a, mean, rstd);
  ex.for_cols(H, [&](int64_t j) {
    r.h[j] = T(ftanh(A(r.gamma[j]) * (a(j) - mean) * rstd + A(r.beta[j])));
  });
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
  A s_g = 0, s_gx = 0;
  ex.for_cols(H, [&](int64_t j) {
    const A xh = ahat(j);
    const A y = ftanh(A(r.gamma[j]) * xh + A(r.beta[j]));
    const A dy = A(r.dh[j]) * (A(1) - y * y);
    const A g = dy * A(r.gamma[j]);
    s_g += g;
    s_gx += g * xh;
    r.dgamma_rows[j] = dy * xh;
    r.dbeta_rows[j] = dy;
  });
  ex.sum2(s_g, s_gx);
  const A m_g = s_g / A(H), m_gx = s_gx / A(H);
  ex.for_cols(H, [&](int64_t j) {  // reads back this thread's own dbeta_rows[j]
    const A xh = ahat(j);
    r.da[j] = T(rstd * (r.dbeta_rows[j] * A(r.gamma[j]) - m_g - xh * m_gx));
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
  row_mean_rstd(ex, 4 * H, eps, [&](int64_t j) { return A(r.hproj[j]); }, mh, rh);
  ex.for_cols(H, [&](int64_t j) {
    A act[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      const A pre = A(r.xgates[q]) + A(r.gamma_h[q]) * (A(r.hproj[q]) - mh) * rh + A(r.bias[q]);
      act[k] = k == 2 ? ftanh(pre) : sigmoid(pre);
      r.gates[q] = act[k];
    }
    // The carried state is rounded to T before LN(c) sees it, so that the
    // backward, which reads c back as T, recomputes exactly these statistics.
    r.c[j] = T(act[1] * A(r.c_prev[j]) + act[0] * act[2]);
  });
  A mc, rc;  // each thread reads back its own c[j]
  row_mean_rstd(ex, H, eps, [&](int64_t j) { return A(r.c[j]); }, mc, rc);
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

// Gradients at column j of the pre-activations (i, f, g, o) and of c_prev,
// given the sums of the c-LN backward (m_g, m_gx: means over H).
template <class T, class A>
LN_EXT_FN void lstm_column_grads(const LstmRow<T, A>& r, int64_t H, int64_t j, A mc, A rc,
                                 A m_g, A m_gx, A dpre[4], A& dc_prev) {
  const A i = r.gates[j], f = r.gates[H + j], g = r.gates[2 * H + j], o = r.gates[3 * H + j];
  const A chat = (A(r.c[j]) - mc) * rc;
  const A tc = ftanh(A(r.gamma_c[j]) * chat + A(r.beta_c[j]));
  const A dh = A(r.dh[j]);
  const A dchat = dh * o * (A(1) - tc * tc) * A(r.gamma_c[j]);
  const A dc = A(r.dc[j]) + rc * (dchat - m_g - chat * m_gx);
  dpre[0] = dc * g * i * (A(1) - i);
  dpre[1] = dc * A(r.c_prev[j]) * f * (A(1) - f);
  dpre[2] = dc * i * (A(1) - g * g);
  dpre[3] = dh * tc * o * (A(1) - o);
  dc_prev = dc * f;
}

template <class T, class A, class Exec>
LN_EXT_FN void lstm_bwd_row(const Exec& ex, const LstmRow<T, A>& r, int64_t H) {
  const A mh = r.stats[0], rh = r.stats[1], mc = r.stats[2], rc = r.stats[3];
  // Pass 1: backward of h = o * tanh(LN(c)) up to d(chat); sums for the c-LN.
  A s_g = 0, s_gx = 0;
  ex.for_cols(H, [&](int64_t j) {
    const A chat = (A(r.c[j]) - mc) * rc;
    const A tc = ftanh(A(r.gamma_c[j]) * chat + A(r.beta_c[j]));
    const A dlnc = A(r.dh[j]) * r.gates[3 * H + j] * (A(1) - tc * tc);
    const A g = dlnc * A(r.gamma_c[j]);
    s_g += g;
    s_gx += g * chat;
    r.dgamma_c_rows[j] = dlnc * chat;
    r.dbeta_c_rows[j] = dlnc;
  });
  ex.sum2(s_g, s_gx);
  const A m_g = s_g / A(H), m_gx = s_gx / A(H);
  // Pass 2: gate gradients, dc_prev, sums for the hproj-LN over 4H.
  A s_h = 0, s_hx = 0;
  ex.for_cols(H, [&](int64_t j) {
    A dpre[4], dcp;
    lstm_column_grads(r, H, j, mc, rc, m_g, m_gx, dpre, dcp);
    r.dc_prev[j] = T(dcp);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      const A hhat = (A(r.hproj[q]) - mh) * rh;
      const A g = dpre[k] * A(r.gamma_h[q]);
      s_h += g;
      s_hx += g * hhat;
      r.dgates[q] = T(dpre[k]);
      r.dgamma_h_rows[q] = dpre[k] * hhat;
    }
  });
  ex.sum2(s_h, s_hx);
  const A m_h = s_h / A(4 * H), m_hx = s_hx / A(4 * H);
  // Pass 3: d(hproj) through its LN; the gate gradients are recomputed in A
  // rather than read back rounded to T.
  ex.for_cols(H, [&](int64_t j) {
    A dpre[4], dcp;
    lstm_column_grads(r, H, j, mc, rc, m_g, m_gx, dpre, dcp);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      const A hhat = (A(r.hproj[q]) - mh) * rh;
      r.dhproj[q] = T(rh * (dpre[k] * A(r.gamma_h[q]) - m_h - hhat * m_hx));
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
  A s_zr = 0, s_n = 0;
  ex.for_cols(H, [&](int64_t j) {
    s_zr += A(r.hproj[j]) + A(r.hproj[H + j]);
    s_n += A(r.hproj[2 * H + j]);
  });
  ex.sum2(s_zr, s_n);
  const A m_zr = s_zr / A(2 * H), m_n = s_n / A(H);
  A q_zr = 0, q_n = 0;
  ex.for_cols(H, [&](int64_t j) {
    const A dz = A(r.hproj[j]) - m_zr, dr = A(r.hproj[H + j]) - m_zr;
    const A dn = A(r.hproj[2 * H + j]) - m_n;
    q_zr += dz * dz + dr * dr;
    q_n += dn * dn;
  });
  ex.sum2(q_zr, q_n);
  const A rs_zr = frsqrt(q_zr / A(2 * H) + eps), rs_n = frsqrt(q_n / A(H) + eps);
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
  auto hhat = [&](int64_t q) {
    return q < 2 * H ? (A(r.hproj[q]) - m_zr) * rs_zr : (A(r.hproj[q]) - m_n) * rs_n;
  };
  // Pass 1: gradients at the three LN outputs (dy = the beta rows) and the
  // LN-backward sums of each group.
  A s_zr = 0, sx_zr = 0, s_n = 0, sx_n = 0;
  ex.for_cols(H, [&](int64_t j) {
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
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int64_t q = k * H + j;
      const A xh = hhat(q), g = dy[k] * A(r.gamma_h[q]);
      if (k < 2) {
        s_zr += g;
        sx_zr += g * xh;
      } else {
        s_n += g;
        sx_n += g * xh;
      }
      r.dgamma_h_rows[q] = dy[k] * xh;
      r.dbeta_h_rows[q] = dy[k];
    }
  });
  ex.sum2(s_zr, sx_zr);
  ex.sum2(s_n, sx_n);
  const A mg_zr = s_zr / A(2 * H), mgx_zr = sx_zr / A(2 * H);
  const A mg_n = s_n / A(H), mgx_n = sx_n / A(H);
  // Pass 2: d(hproj) through each group's LN (reads back own dbeta_h_rows).
  ex.for_cols(H, [&](int64_t j) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int64_t q = k * H + j;
      const A rs = k < 2 ? rs_zr : rs_n, mg = k < 2 ? mg_zr : mg_n, mgx = k < 2 ? mgx_zr : mgx_n;
      r.dhproj[q] = T(rs * (r.dbeta_h_rows[q] * A(r.gamma_h[q]) - mg - hhat(q) * mgx));
    }
  });
}

// ---------------------------------------------------------------- executors

// CPU: the calling thread owns the whole row.
struct SerialRow {
  template <class F>
  inline void for_cols(int64_t n, F f) const {
    for (int64_t j = 0; j < n; ++j) f(j);
  }
  template <class A>
  inline void sum2(A&, A&) const {}
  inline bool leader() const { return true; }
};

#ifdef __CUDACC__
// CUDA: the thread block owns the row; blockDim.x is a multiple of 32, <= 1024.
struct BlockRow {
  template <class F>
  __device__ __forceinline__ void for_cols(int64_t n, F f) const {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j);
  }
  // Replaces a and b by their sums over the block (a fixed-order tree).
  template <class A>
  __device__ __forceinline__ void sum2(A& a, A& b) const {
    __shared__ A partial[2][32];
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
  rnn_fwd_row(BlockRow{}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void rnn_bwd_kernel(RnnRow<T, A> r, int64_t H) {
  rnn_bwd_row(BlockRow{}, r.at(blockIdx.x, H), H);
}
template <class T, class A>
__global__ void lstm_fwd_kernel(LstmRow<T, A> r, int64_t H, A eps) {
  lstm_fwd_row(BlockRow{}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void lstm_bwd_kernel(LstmRow<T, A> r, int64_t H) {
  lstm_bwd_row(BlockRow{}, r.at(blockIdx.x, H), H);
}
template <class T, class A>
__global__ void gru_fwd_kernel(GruRow<T, A> r, int64_t H, A eps) {
  gru_fwd_row(BlockRow{}, r.at(blockIdx.x, H), H, eps);
}
template <class T, class A>
__global__ void gru_bwd_kernel(GruRow<T, A> r, int64_t H) {
  gru_bwd_row(BlockRow{}, r.at(blockIdx.x, H), H);
}
#endif  // __CUDACC__

}  // namespace cell
}  // namespace ln_ext
