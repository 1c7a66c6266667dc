// Channels-first LayerNorm / RMSNorm (layer_norm.h): the op bodies (checks, allocation,
// shared by CPU and CUDA) and the CPU kernels.
//
// CPU: x viewed as [B, C, S]. Work unit: one b and a tile of up to kTile consecutive
// positions s; each channel of the tile is a contiguous run of x, so the loops over the
// tile vectorize while the C channels are walked S apart (NCHW read in place, no permute).
// Forward: three passes over the tile's channels (shift, deviations, y); backward: two (row
// sums, dx), accumulating dweight/dbias of a fixed number of unit ranges (by shape only) that
// are added in range order: the same bits on any number of threads.
#include "layer_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace ln_ext {
namespace {

// x: [B, C, *spatial] -> (B, C, S).
std::array<int64_t, 3> channel_dims(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, op, ": input must be [batch, channels, *spatial] (at least 2 dims), got shape ",
              x.sizes());
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {x.size(0), x.size(1), spatial};
}

std::vector<int64_t> stats_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.erase(shape.begin() + 1);
  return shape;
}

}  // namespace

ChannelNormFwdArgs channel_norm_fwd_impl(const char* op, const at::Tensor& x, const OptTensor& weight,
                                         const OptTensor& bias, double eps, double weight_offset, OptDtype out_dtype,
                                         bool centered, ChannelNormFwdKernel kernel) {
  check_input_dtype(op, x, "input");
  const auto [batch, channels, spatial] = channel_dims(op, x);
  check_params(op, weight, bias, x, {channels});
  check_weight_offset(op, weight_offset, weight);
  const auto y_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(dtype_matches(y_dtype, x.scalar_type()), op, ": out_dtype must be the input's dtype or, for a "
              "float16/bfloat16 input, float32; got ", y_dtype);
  ChannelNormFwdArgs a;
  a.centered = centered;
  a.x = x.contiguous();
  a.weight = contiguous_or_undefined(weight);
  a.bias = centered ? contiguous_or_undefined(bias) : at::Tensor();
  a.batch = batch;
  a.channels = channels;
  a.spatial = spatial;
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.y = at::empty(x.sizes(), x.options().dtype(y_dtype));
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  if (centered) a.mean = at::empty(stats_shape(x), stats_opts);
  a.rstd = at::empty(stats_shape(x), stats_opts);
  if (batch * spatial > 0 && channels == 0) {  // as aten: the mean of nothing is 0, its spread undefined
    if (a.mean.defined()) a.mean.zero_();
    a.rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (batch * spatial > 0) {
    kernel(a);
  }
  return a;
}

std::array<at::Tensor, 3> channel_norm_bwd_impl(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                                const OptTensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                                                const OptTensor& bias, std::array<bool, 3> output_mask,
                                                double weight_offset, bool centered, ChannelNormBwdKernel kernel) {
  check_backward_inputs(op, dy, x, rstd);
  const auto [batch, channels, spatial] = channel_dims(op, x);
  const auto want_stats = stats_shape(x);
  TORCH_CHECK(!centered || defined(mean), op, ": mean is required");
  if (centered) check_same_device(op, *mean, x, "mean");
  const auto stats_t = stats_dtype(x.scalar_type());
  TORCH_CHECK(rstd.sizes() == at::IntArrayRef(want_stats) && rstd.scalar_type() == stats_t &&
                  (!centered || (mean->sizes() == rstd.sizes() && mean->scalar_type() == stats_t)),
              op, ": mean/rstd must be ", stats_t, " of shape ", want_stats, " (the input's without dim 1), got ",
              rstd.scalar_type(), " ", rstd.sizes());
  check_params(op, weight, bias, x, {channels});
  check_weight_offset(op, weight_offset, weight);

  ChannelNormBwdArgs a;
  a.centered = centered;
  a.dy = dy.contiguous();
  a.x = x.contiguous();
  if (centered) a.mean = mean->contiguous();
  a.rstd = rstd.contiguous();
  a.weight = contiguous_or_undefined(weight);
  a.batch = batch;
  a.channels = channels;
  a.spatial = spatial;
  a.weight_offset = weight_offset;
  std::tie(a.dx, a.dweight, a.dbias) = std::tuple_cat(new_grads(x, weight, bias, output_mask));
  if (batch * spatial == 0 || channels == 0) {  // no position contributes
    if (a.dweight.defined()) a.dweight.zero_();
    if (a.dbias.defined()) a.dbias.zero_();
    if (a.dx.defined()) a.dx.zero_();
  } else if (a.dx.defined() || a.dweight.defined() || a.dbias.defined()) {
    kernel(a);
  }
  return grads_as_outputs(x, {a.dx, a.dweight, a.dbias});
}

Tensor3 call_channels_first_layer_norm_fwd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                           double eps, double weight_offset, OptDtype out_dtype) {
  static const auto op =
      op_handle<decltype(call_channels_first_layer_norm_fwd)>("ln_ext::channels_first_layer_norm_fwd");
  return op.call(x, weight, bias, eps, weight_offset, out_dtype);
}
Tensor2 call_channels_first_rms_norm_fwd(const at::Tensor& x, const OptTensor& weight, double eps,
                                         double weight_offset, OptDtype out_dtype) {
  static const auto op = op_handle<decltype(call_channels_first_rms_norm_fwd)>("ln_ext::channels_first_rms_norm_fwd");
  return op.call(x, weight, eps, weight_offset, out_dtype);
}
Tensor3 call_channels_first_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                                           std::array<bool, 3> output_mask, double weight_offset) {
  static const auto op =
      op_handle<decltype(call_channels_first_layer_norm_bwd)>("ln_ext::channels_first_layer_norm_bwd");
  return op.call(dy, x, mean, rstd, weight, bias, output_mask, weight_offset);
}
Tensor2 call_channels_first_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                         const OptTensor& weight, std::array<bool, 2> output_mask,
                                         double weight_offset, std::optional<double> eps) {
  static const auto op = op_handle<decltype(call_channels_first_rms_norm_bwd)>("ln_ext::channels_first_rms_norm_bwd");
  return op.call(dy, x, rstd, weight, output_mask, weight_offset, eps);
}

// ---------------------------------------------------------------- CPU kernels
namespace {

constexpr int64_t kTile = 64;  // positions per work unit: 256 bytes of float32 per channel

// The gain and bias of channel c (absent: 1 and 0).
template <typename A, typename P>
inline A gain_at(const P* w, A offset, int64_t c) {
  return w == nullptr ? A(1) : static_cast<A>(w[c]) + offset;
}

template <typename T, typename P, typename Y, bool kCentered>
void fwd_unit(const ChannelNormFwdArgs& a, int64_t unit) {
  using A = at::opmath_type<T>;
  const int64_t C = a.channels, S = a.spatial, tiles = (S + kTile - 1) / kTile;
  const int64_t b = unit / tiles, s0 = unit % tiles * kTile, n = std::min(kTile, S - s0);
  const T* x = a.x.const_data_ptr<T>() + b * C * S + s0;
  Y* y = a.y.mutable_data_ptr<Y>() + b * C * S + s0;
  const P* w = a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr;
  const P* bias = a.bias.defined() ? a.bias.const_data_ptr<P>() : nullptr;
  const A eps = static_cast<A>(a.eps), offset = static_cast<A>(a.weight_offset), inv_c = A(1) / A(C);
  A shift[kTile] = {}, residual[kTile] = {}, rstd[kTile];
  if constexpr (kCentered) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < n; ++i) shift[i] += static_cast<A>(x[c * S + i]);
    for (int64_t i = 0; i < n; ++i) shift[i] *= inv_c;
    A sum_d[kTile] = {}, sum_dd[kTile] = {};
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < n; ++i) {
        const A d = static_cast<A>(x[c * S + i]) - shift[i];
        sum_d[i] += d;
        sum_dd[i] += d * d;
      }
    }
    A* mean = a.mean.mutable_data_ptr<A>() + b * S + s0;
    for (int64_t i = 0; i < n; ++i) {  // the corrected two-pass statistics (norm_math.cuh)
      residual[i] = sum_d[i] * inv_c;
      const A m2 = std::max(sum_dd[i] - sum_d[i] * residual[i], A(0));
      rstd[i] = A(1) / std::sqrt(m2 * inv_c + eps);
      mean[i] = shift[i] + residual[i];
    }
  } else {
    A sq[kTile] = {};
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < n; ++i) {
        const A v = static_cast<A>(x[c * S + i]);
        sq[i] += v * v;
      }
    }
    for (int64_t i = 0; i < n; ++i) rstd[i] = A(1) / std::sqrt(sq[i] * inv_c + eps);
  }
  std::copy(rstd, rstd + n, a.rstd.mutable_data_ptr<A>() + b * S + s0);
  for (int64_t c = 0; c < C; ++c) {
    const A g = gain_at(w, offset, c), bc = bias == nullptr ? A(0) : static_cast<A>(bias[c]);
    for (int64_t i = 0; i < n; ++i) {
      y[c * S + i] = static_cast<Y>(((static_cast<A>(x[c * S + i]) - shift[i]) - residual[i]) * rstd[i] * g + bc);
    }
  }
}

// Units [begin, end) of the backward; dw/db (acc_t [C] each, or null): this range's sums.
template <typename T, typename D, typename P, bool kCentered>
void bwd_units(const ChannelNormBwdArgs& a, int64_t begin, int64_t end, at::opmath_type<T>* dw,
               at::opmath_type<T>* db) {
  using A = at::opmath_type<T>;
  const int64_t C = a.channels, S = a.spatial, tiles = (S + kTile - 1) / kTile;
  const P* w = a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr;
  const A offset = static_cast<A>(a.weight_offset), nc = static_cast<A>(C), inv_c = A(1) / nc;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / tiles, s0 = unit % tiles * kTile, n = std::min(kTile, S - s0);
    const T* x = a.x.const_data_ptr<T>() + b * C * S + s0;
    const D* dy = a.dy.const_data_ptr<D>() + b * C * S + s0;
    T* dx = a.dx.defined() ? a.dx.mutable_data_ptr<T>() + b * C * S + s0 : nullptr;
    const A* rstd = a.rstd.const_data_ptr<A>() + b * S + s0;
    A mu[kTile] = {};
    if constexpr (kCentered) std::copy(a.mean.const_data_ptr<A>() + b * S + s0, a.mean.const_data_ptr<A>() + b * S + s0 + n, mu);
    // Pass 1: sum(d), sum(g), sum(g d), d = x - mean (RMSNorm: d = x, only sum(g x)).
    A sum_d[kTile] = {}, sum_g[kTile] = {}, sum_gd[kTile] = {};
    for (int64_t c = 0; c < C; ++c) {
      const A gain = gain_at(w, offset, c);
      for (int64_t i = 0; i < n; ++i) {
        const A g = static_cast<A>(dy[c * S + i]) * gain, d = static_cast<A>(x[c * S + i]) - mu[i];
        sum_d[i] += d;
        sum_g[i] += g;
        sum_gd[i] += g * d;
      }
    }
    // The stored mean's rounding, taken out again: xhat = (d - residual) * rstd.
    A residual[kTile], sum_gx[kTile], total_g[kTile], rstd_n[kTile];
    for (int64_t i = 0; i < n; ++i) {
      residual[i] = kCentered ? sum_d[i] * inv_c : A(0);
      sum_gx[i] = rstd[i] * (sum_gd[i] - residual[i] * (kCentered ? sum_g[i] : A(0)));
      total_g[i] = kCentered ? sum_g[i] : A(0);  // RMSNorm takes no mean(g) out
      rstd_n[i] = rstd[i] * inv_c;
    }
    for (int64_t c = 0; c < C; ++c) {
      const A gain = gain_at(w, offset, c);
      A dw_c = 0, db_c = 0;
      for (int64_t i = 0; i < n; ++i) {
        const A dyv = static_cast<A>(dy[c * S + i]);
        const A xhat = ((static_cast<A>(x[c * S + i]) - mu[i]) - residual[i]) * rstd[i];
        if (dx != nullptr) {
          const A g = dyv * gain;  // a product multiplied again: n g - sum(g) cancels exactly (C = 1)
          dx[c * S + i] = static_cast<T>(rstd_n[i] * (g * nc - total_g[i] - xhat * sum_gx[i]));
        }
        dw_c += dyv * xhat;
        db_c += dyv;
      }
      if (dw != nullptr) {
        dw[c] += dw_c;
        db[c] += db_c;
      }
    }
  }
}

// f(T{}, P{}, Y{}) for x's dtype, the parameters' (x's, or float32 beside 16-bit x) and y's.
template <typename F>
void with_types(at::ScalarType x_t, at::ScalarType p_t, at::ScalarType y_t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t, "channels_first_norm", [&] {
    using T = scalar_t;
    auto with_y = [&](auto p_tag) {
      if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
        if (y_t == at::kFloat) return f(T{}, p_tag, float{});
      }
      f(T{}, p_tag, T{});
    };
    if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
      if (p_t == at::kFloat) return with_y(float{});
    }
    with_y(T{});
  });
}

at::ScalarType param_dtype(const at::Tensor& w, const at::Tensor& b, const at::Tensor& x) {
  return w.defined() ? w.scalar_type() : b.defined() ? b.scalar_type() : x.scalar_type();
}

}  // namespace

void channel_norm_fwd_cpu_kernel(const ChannelNormFwdArgs& a) {
  const int64_t units = a.batch * ((a.spatial + kTile - 1) / kTile);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.channels * kTile));
  with_types(a.x.scalar_type(), param_dtype(a.weight, a.bias, a.x), a.y.scalar_type(), [&](auto t, auto p, auto y) {
    using T = decltype(t);
    using P = decltype(p);
    using Y = decltype(y);
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        a.centered ? fwd_unit<T, P, Y, true>(a, u) : fwd_unit<T, P, Y, false>(a, u);
      }
    });
  });
}

void channel_norm_bwd_cpu_kernel(const ChannelNormBwdArgs& a) {
  const int64_t C = a.channels, units = a.batch * ((a.spatial + kTile - 1) / kTile);
  const bool want_params = a.dweight.defined() || a.dbias.defined();
  // Ranges of units whose dweight/dbias sums are added in range order: their number fixed by
  // the shape alone (at most 64, each at least 64K elements of work), never by the threads.
  const int64_t ranges = want_params ? std::clamp<int64_t>(units * kTile * C / 65536, 1, std::min<int64_t>(64, units)) : 0;
  const auto acc = stats_dtype(a.x.scalar_type());
  at::Tensor partial = want_params ? at::zeros({ranges, 2, C}, a.x.options().dtype(acc)) : at::Tensor();
  // dy's dtype: x's, or float32 beside a 16-bit x.
  const bool dy_float = a.dy.scalar_type() != a.x.scalar_type();
  with_types(a.x.scalar_type(), a.weight.defined() ? a.weight.scalar_type() : a.x.scalar_type(), a.x.scalar_type(),
             [&](auto t, auto p, auto) {
    using T = decltype(t);
    using P = decltype(p);
    using A = at::opmath_type<T>;
    auto run = [&](auto d) {
      using D = decltype(d);
      const auto units_fn = a.centered ? bwd_units<T, D, P, true> : bwd_units<T, D, P, false>;
      if (!want_params) {
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * kTile));
        at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { units_fn(a, b, e, nullptr, nullptr); });
        return;
      }
      A* part = partial.mutable_data_ptr<A>();
      at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          units_fn(a, r * units / ranges, (r + 1) * units / ranges, part + r * 2 * C, part + r * 2 * C + C);
        }
      });
    };
    if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
      if (dy_float) return run(float{});
    }
    run(T{});
  });
  if (!want_params) return;
  at::Tensor sums = partial[0];
  for (int64_t r = 1; r < ranges; ++r) sums = sums + partial[r];  // in range order
  if (a.dweight.defined()) a.dweight.copy_(sums[0]);
  if (a.dbias.defined()) a.dbias.copy_(sums[1]);
}

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  register_channel_norm_ops<channel_norm_fwd_cpu_kernel, channel_norm_bwd_cpu_kernel>(m);
}

}  // namespace ln_ext
