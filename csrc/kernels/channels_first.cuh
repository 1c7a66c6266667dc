// Channels-first LayerNorm / RMSNorm kernels (ConvNeXt's and timm's LayerNorm2d). Device
// code only; knows nothing of torch.
//
// x: [B, C, S] (S: the product of the dims after the channel dim, NCHW as it is), one norm
// per (b, s) over its C channels, which lie S elements apart; weight/bias: [C];
// mean/rstd: [B, S]. The row kernels' arithmetic (norm_math.cuh): corrected two-pass
// statistics (the mean of a first pass as the shift, then sum(x - shift) beside
// sum((x - shift)^2)), gain = weight_offset + weight, dx = rstd / C * (C g - sum(g) -
// xhat sum(g xhat)), g = dy * gain, so C = 1 gives y = bias and dx = 0 exactly.
//
// Work split: one thread per position (b, s), grid-stride over the B * S positions; each
// thread walks its C channels (stride S), so a warp reads 32 consecutive positions of one
// channel: coalesced, with no permute copy. Forward: three passes over the channels (shift,
// deviations, y); backward: two (row sums, then dx). The passes re-read x (and dy) from L1/L2.
// dweight/dbias (backward): per channel, each warp sums its 32 positions' dy * xhat and dy
// (xor butterfly) into its own row of shared memory [warps, 2, C]; the block's rows are
// added in warp order into partials [gridDim.x, 2, C], which layer_norm_bwd_param_reduce_kernel
// sums in block order: no float atomics, the same bits on every run.
// Assumes: C >= 1, blockDim.x a multiple of 32; backward: dynamic shared memory of
// warps * 2 * C acc values when partials are asked for.
// Measured: not yet on a GPU. Scalar accesses (no 16-byte vectors along S yet): expect well
// under the row kernels' fraction of the copy bandwidth for small C.
#pragma once

#include "norm_math.cuh"
#include "reduce.cuh"
#include "vec.cuh"

namespace ln_ext {
namespace kernels {

template <typename T, typename P, typename Y>
struct ChannelFwdParams {
  const T* x;          // [B, C, S]
  const P* weight;     // [C] or nullptr (acts as 1)
  const P* bias;       // [C] or nullptr (acts as 0); RMSNorm: nullptr
  Y* y;                // [B, C, S]
  acc_t<T>* mean;      // [B, S]; RMSNorm: nullptr
  acc_t<T>* rstd;      // [B, S]
  int64_t positions;   // B * S
  int64_t spatial;     // S
  int channels;        // C
  acc_t<T> eps;
  acc_t<T> weight_offset;  // the gain is weight_offset + weight (0 without a weight)
};

template <typename T, typename DY, typename P>
struct ChannelBwdParams {
  const DY* dy;            // [B, C, S]
  const T* x;              // [B, C, S]
  const acc_t<T>* mean;    // [B, S]; RMSNorm: nullptr
  const acc_t<T>* rstd;    // [B, S]
  const P* weight;         // [C] or nullptr
  T* dx;                   // [B, C, S] or nullptr (not asked for)
  acc_t<T>* partials;      // [gridDim.x, 2, C] or nullptr (dweight/dbias not asked for)
  int64_t positions, spatial;
  int channels;
  acc_t<T> weight_offset;
};

template <typename A, typename P>
__device__ __forceinline__ A channel_gain(const P* weight, A offset, int c) {
  return weight == nullptr ? A(1) : to_acc(weight[c]) + offset;
}

// Element c of position (b, s): base + c * S, base = b * C * S + s.
__device__ __forceinline__ int64_t channel_base(int64_t pos, int64_t spatial, int channels) {
  const int64_t b = pos / spatial;
  return b * channels * spatial + (pos - b * spatial);
}

template <typename T, typename P, typename Y, bool kCentered>
__global__ void __launch_bounds__(256) channels_first_fwd_kernel(const ChannelFwdParams<T, P, Y> p) {
  using A = acc_t<T>;
  const int C = p.channels;
  const int64_t S = p.spatial;
  for (int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pos < p.positions;
       pos += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* x = p.x + channel_base(pos, S, C);
    RowStats<A> st{A(0), A(0), A(0)};
    if constexpr (kCentered) {
      A sum = 0;
      for (int c = 0; c < C; ++c) sum += to_acc(x[c * S]);
      const A shift = sum / A(C);
      A sum_d = 0, sum_dd = 0;
      for (int c = 0; c < C; ++c) {
        const A d = to_acc(x[c * S]) - shift;
        sum_d += d;
        sum_dd += d * d;
      }
      st = corrected_stats(shift, sum_d, sum_dd, A(C), p.eps);
      p.mean[pos] = st.mean();
    } else {
      A sq = 0;
      for (int c = 0; c < C; ++c) {
        const A v = to_acc(x[c * S]);
        sq += v * v;
      }
      st.rstd = inv_sqrt(sq / A(C) + p.eps);
    }
    p.rstd[pos] = st.rstd;
    Y* y = p.y + channel_base(pos, S, C);
    for (int c = 0; c < C; ++c) {
      const A bias = p.bias == nullptr ? A(0) : to_acc(p.bias[c]);
      y[c * S] = from_acc<Y>(st.xhat(to_acc(x[c * S])) * channel_gain(p.weight, p.weight_offset, c) + bias);
    }
  }
}

template <typename T, typename DY, typename P, bool kCentered>
__global__ void __launch_bounds__(256) channels_first_bwd_kernel(const ChannelBwdParams<T, DY, P> p) {
  using A = acc_t<T>;
  const int C = p.channels;
  const int64_t S = p.spatial;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  LN_EXT_DYNAMIC_SHARED(smem_raw);
  A* sums = reinterpret_cast<A*>(smem_raw);  // [warps, 2, C]: this block's dweight, dbias sums
  if (p.partials != nullptr) {
    for (int i = threadIdx.x; i < warps * 2 * C; i += blockDim.x) sums[i] = A(0);
    __syncthreads();
  }
  // Every thread runs the same iterations (the warps' shuffles need all lanes); a thread
  // past the last position adds zeros.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x); first < p.positions; first += stride) {
    const int64_t pos = first + threadIdx.x;
    const bool active = pos < p.positions;
    const int64_t base = active ? channel_base(pos, S, C) : 0;
    const A mu = kCentered && active ? p.mean[pos] : A(0);
    const A rstd = active ? p.rstd[pos] : A(0);
    // Pass 1: sum(d), sum(g), sum(g d), d = x - mean (RMSNorm: d = x, only sum(g x)).
    A sum_d = 0, sum_g = 0, sum_gd = 0;
    if (active) {
      for (int c = 0; c < C; ++c) {
        const A dy = to_acc(p.dy[base + c * S]);
        const A g = dy * channel_gain(p.weight, p.weight_offset, c);
        const A d = to_acc(p.x[base + c * S]) - mu;
        sum_d += d;
        sum_g += g;
        sum_gd += g * d;
      }
    }
    // The stored mean's rounding, taken out again: xhat = (d - residual) * rstd.
    const A residual = kCentered ? sum_d / A(C) : A(0);
    const A sum_gx = kCentered ? rstd * (sum_gd - residual * sum_g) : rstd * sum_gd;
    const A total_g = kCentered ? sum_g : A(0);  // RMSNorm takes no mean(g) out
    const A rstd_n = rstd / A(C);
    for (int c = 0; c < C; ++c) {
      A dw = 0, db = 0;
      if (active) {
        const A dy = to_acc(p.dy[base + c * S]);
        const A g = dy * channel_gain(p.weight, p.weight_offset, c);
        const A xhat = ((to_acc(p.x[base + c * S]) - mu) - residual) * rstd;
        if (p.dx != nullptr) p.dx[base + c * S] = from_acc<T>(layer_norm_dx(g, xhat, A(C), total_g, sum_gx, rstd_n));
        dw = dy * xhat;
        db = dy;
      }
      if (p.partials != nullptr) {
        A v[2] = {dw, db};
        warp_group_sums<2>(v, 32);
        if (lane == 0) {
          sums[(warp * 2) * C + c] += v[0];
          sums[(warp * 2 + 1) * C + c] += v[1];
        }
      }
    }
  }
  if (p.partials == nullptr) return;
  __syncthreads();
  A* out = p.partials + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += sums[w * 2 * C + i];
    out[i] = total;
  }
}

}  // namespace kernels
}  // namespace ln_ext
