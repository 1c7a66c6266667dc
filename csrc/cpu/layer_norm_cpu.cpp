// LayerNorm on the CPU.
//
// Forward: rows split across threads (at::parallel_for); each row is converted
// once into an acc_t buffer, then mean and the centered sum of squares come from
// two vectorized passes over that copy, and y from a third. acc_t is float32
// (float64 for double input). Backward: rows are cut into a fixed number of
// blocks, independent of the thread count; each block writes dx and its own
// partial dweight/dbias, and the partials are summed in block order, so the
// gradients are bitwise reproducible.
#include "../layer_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace ln_ext {
namespace {

using at::vec::Vectorized;

// The row as acc_t: the input itself when it already is acc_t, else a converted copy.
template <typename T, typename acc_t>
const acc_t* row_as_acc(const T* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf.data(), n);
    return buf.data();
  }
}

// weight/bias as acc_t [N]; an absent one becomes `fill` (1 for weight, 0 for bias).
template <typename acc_t>
at::Tensor param_as_acc(const at::Tensor& p, int64_t n, double fill, const at::Tensor& like) {
  const auto dtype = c10::CppTypeToScalarType<acc_t>::value;
  return p.defined() ? p.to(dtype).contiguous() : at::full({n}, fill, like.options().dtype(dtype));
}

template <typename T, typename out_t>
void fwd_rows(const LayerNormFwdArgs& a) {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.cols;
  const at::Tensor w = param_as_acc<acc_t>(a.weight, N, 1.0, a.x);
  const at::Tensor b = param_as_acc<acc_t>(a.bias, N, 0.0, a.x);
  const acc_t* w_ptr = w.data_ptr<acc_t>();
  const acc_t* b_ptr = b.data_ptr<acc_t>();
  const T* x_ptr = a.x.data_ptr<T>();
  out_t* y_ptr = a.y.data_ptr<out_t>();
  acc_t* mean_ptr = a.mean.data_ptr<acc_t>();
  acc_t* rstd_ptr = a.rstd.data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / N);

  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_buf(std::is_same_v<T, acc_t> ? 0 : N);
    std::vector<acc_t> y_buf(std::is_same_v<out_t, acc_t> ? 0 : N);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* x = row_as_acc(x_ptr + row * N, N, x_buf);
      const acc_t mu = at::vec::reduce_all<acc_t>(
                           [](Vec p, Vec q) { return p + q; }, x, N) / N;
      const acc_t var = at::vec::map_reduce_all<acc_t>(
                            [mu](Vec v) { const Vec d = v - Vec(mu); return d * d; },
                            [](Vec p, Vec q) { return p + q; }, x, N) / N;
      const acc_t rs = acc_t(1) / std::sqrt(var + eps);
      acc_t* y = y_buf.empty() ? reinterpret_cast<acc_t*>(y_ptr + row * N) : y_buf.data();
      at::vec::map3<acc_t>(
          [mu, rs](Vec v, Vec g, Vec s) { return (v - Vec(mu)) * Vec(rs) * g + s; },
          y, x, w_ptr, b_ptr, N);
      if (!y_buf.empty()) at::vec::convert(y_buf.data(), y_ptr + row * N, N);
      mean_ptr[row] = mu;
      rstd_ptr[row] = rs;
    }
  });
}

// Fixed so that the partial sums, and so the bits of dweight/dbias, do not
// depend on how many threads run.
constexpr int64_t kBwdBlocks = 64;

template <typename T, typename dy_t>
void bwd_rows(const LayerNormBwdArgs& a) {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t M = a.rows, N = a.cols;
  const at::Tensor w = param_as_acc<acc_t>(a.weight, N, 1.0, a.x);
  const acc_t* w_ptr = w.data_ptr<acc_t>();
  const T* x_ptr = a.x.data_ptr<T>();
  const dy_t* dy_ptr = a.dy.data_ptr<dy_t>();
  const acc_t* mean_ptr = a.mean.data_ptr<acc_t>();
  const acc_t* rstd_ptr = a.rstd.data_ptr<acc_t>();
  T* dx_ptr = a.dx.defined() ? a.dx.data_ptr<T>() : nullptr;
  const bool want_params = a.dweight.defined() || a.dbias.defined();
  const int64_t blocks = std::min(M, kBwdBlocks);
  // partial[blk]: dweight partial sums [N], then dbias partial sums [N].
  std::vector<acc_t> partial(want_params ? blocks * 2 * N : 0, acc_t(0));

  at::parallel_for(0, blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<acc_t> x_buf(std::is_same_v<T, acc_t> ? 0 : N);
    std::vector<acc_t> dy_buf(std::is_same_v<dy_t, acc_t> ? 0 : N);
    std::vector<acc_t> dx_buf(std::is_same_v<T, acc_t> ? 0 : N);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      acc_t* dw_part = want_params ? partial.data() + blk * 2 * N : nullptr;
      acc_t* db_part = want_params ? dw_part + N : nullptr;
      for (int64_t row = blk * M / blocks; row < (blk + 1) * M / blocks; ++row) {
        const acc_t* x = row_as_acc(x_ptr + row * N, N, x_buf);
        const acc_t* dy = row_as_acc(dy_ptr + row * N, N, dy_buf);
        const acc_t mu = mean_ptr[row], rs = rstd_ptr[row];
        // sum(g) and sum(g * xhat) with g = dy * w and xhat = (x - mu) * rs.
        Vec sum_g(0), sum_gx(0);
        int64_t i = 0;
        for (; i + kLanes <= N; i += kLanes) {
          const Vec g = Vec::loadu(dy + i) * Vec::loadu(w_ptr + i);
          const Vec xh = (Vec::loadu(x + i) - Vec(mu)) * Vec(rs);
          sum_g = sum_g + g;
          sum_gx = sum_gx + g * xh;
          if (want_params) {
            (Vec::loadu(dw_part + i) + Vec::loadu(dy + i) * xh).store(dw_part + i);
            (Vec::loadu(db_part + i) + Vec::loadu(dy + i)).store(db_part + i);
          }
        }
        acc_t s_g = at::vec::vec_reduce_all<acc_t>([](Vec p, Vec q) { return p + q; }, sum_g);
        acc_t s_gx = at::vec::vec_reduce_all<acc_t>([](Vec p, Vec q) { return p + q; }, sum_gx);
        for (int64_t j = i; j < N; ++j) {
          const acc_t g = dy[j] * w_ptr[j];
          const acc_t xh = (x[j] - mu) * rs;
          s_g += g;
          s_gx += g * xh;
          if (want_params) {
            dw_part[j] += dy[j] * xh;
            db_part[j] += dy[j];
          }
        }
        if (dx_ptr == nullptr) continue;
        // dx = rs * (g - mean(g) - xhat * mean(g * xhat))
        const acc_t c_g = s_g / N, c_gx = s_gx / N;
        acc_t* dx = dx_buf.empty() ? reinterpret_cast<acc_t*>(dx_ptr + row * N) : dx_buf.data();
        at::vec::map3<acc_t>(
            [mu, rs, c_g, c_gx](Vec xv, Vec dyv, Vec wv) {
              const Vec xh = (xv - Vec(mu)) * Vec(rs);
              return Vec(rs) * (dyv * wv - Vec(c_g) - xh * Vec(c_gx));
            },
            dx, x, dy, w_ptr, N);
        if (!dx_buf.empty()) at::vec::convert(dx_buf.data(), dx_ptr + row * N, N);
      }
    }
  });

  if (!want_params) return;
  // Sum the block partials in block order; columns are independent.
  at::Tensor dw_acc = at::empty({N}, w.options());
  at::Tensor db_acc = at::empty({N}, w.options());
  acc_t* dw_out = dw_acc.data_ptr<acc_t>();
  acc_t* db_out = db_acc.data_ptr<acc_t>();
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t sw = 0, sb = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        sw += partial[blk * 2 * N + j];
        sb += partial[blk * 2 * N + N + j];
      }
      dw_out[j] = sw;
      db_out[j] = sb;
    }
  });
  // dweight/dbias have normalized_shape, which may have several dims.
  if (a.dweight.defined()) a.dweight.copy_(dw_acc.view(a.dweight.sizes()));
  if (a.dbias.defined()) a.dbias.copy_(db_acc.view(a.dbias.sizes()));
}

}  // namespace

void layer_norm_fwd_cpu_kernel(const LayerNormFwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    if (a.y.scalar_type() == a.x.scalar_type()) {
      fwd_rows<scalar_t, scalar_t>(a);
    } else {
      fwd_rows<scalar_t, float>(a);
    }
  });
}

void layer_norm_bwd_cpu_kernel(const LayerNormBwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    if (a.dy.scalar_type() == a.x.scalar_type()) {
      bwd_rows<scalar_t, scalar_t>(a);
    } else {
      bwd_rows<scalar_t, float>(a);
    }
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype) {
  return layer_norm_fwd_impl(x, normalized_shape, weight, bias, eps, out_dtype,
                             layer_norm_fwd_cpu_kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, std::array<bool, 3> output_mask) {
  return layer_norm_bwd_impl(dy, x, mean, rstd, weight, bias, output_mask,
                             layer_norm_bwd_cpu_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace ln_ext
