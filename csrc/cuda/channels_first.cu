// CUDA entry of the channels-first norms (kernels/channels_first.cuh): dtype dispatch, grid
// and shared memory sizing, on x's device and current stream; registers the ops for CUDA.
// Dtypes: x float32/float64/float16/bfloat16; weight/bias x's or float32 beside 16-bit x;
// y x's or float32 (out_dtype); dy x's or float32 beside 16-bit x.
#include "../layer_norm.h"
#include "../kernels/channels_first.cuh"
#include "launch_common.cuh"
#include "norm_bwd_launch.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ln_ext {
namespace cuda_launch {
namespace {

constexpr int kChannelBlock = 256;

// f(T{}) for x's dtype.
template <typename F>
void with_input_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, "ln_ext (CUDA): unsupported input dtype ", t);
  }
}

// f(U{}) for a second tensor's dtype: T's, or float32 beside a 16-bit T (the ops checked it).
template <typename T, typename F>
void with_t_or_float(at::ScalarType t, F&& f) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    if (t == at::kFloat) return f(float{});
  }
  f(T{});
}

// The kernels count channels in int.
void check_channels(int64_t channels) {
  TORCH_CHECK(channels <= INT_MAX, "ln_ext (CUDA): a channels-first norm over ", channels,
              " channels is more than the supported ", INT_MAX);
}

template <typename T>
void launch_channels_fwd(const ChannelNormFwdArgs& a, cudaStream_t stream) {
  using A = kernels::acc_t<T>;
  check_channels(a.channels);
  const auto p_dtype = a.weight.defined() ? a.weight.scalar_type()
                                          : a.bias.defined() ? a.bias.scalar_type() : a.x.scalar_type();
  with_t_or_float<T>(p_dtype, [&](auto p_tag) {
    with_t_or_float<T>(a.y.scalar_type(), [&](auto y_tag) {
      using P = decltype(p_tag);
      using Y = decltype(y_tag);
      kernels::ChannelFwdParams<T, P, Y> p;
      p.x = const_ptr<T>(a.x);
      p.weight = const_ptr<P>(a.weight);
      p.bias = const_ptr<P>(a.bias);
      p.y = mut_ptr<Y>(a.y);
      p.mean = mut_ptr<A>(a.mean);
      p.rstd = mut_ptr<A>(a.rstd);
      p.positions = a.batch * a.spatial;
      p.spatial = a.spatial;
      p.channels = static_cast<int>(a.channels);
      p.eps = static_cast<A>(a.eps);
      p.weight_offset = static_cast<A>(a.weight_offset);
      auto kernel = a.centered ? kernels::channels_first_fwd_kernel<T, P, Y, true>
                               : kernels::channels_first_fwd_kernel<T, P, Y, false>;
      const int grid = persistent_grid(kernel, ceil_div(p.positions, kChannelBlock), kChannelBlock);
      log_launch("channels-first fwd", p.positions, a.channels, grid, kChannelBlock, 0, 0);
      kernel<<<grid, kChannelBlock, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T>
void launch_channels_bwd(const ChannelNormBwdArgs& a, cudaStream_t stream) {
  using A = kernels::acc_t<T>;
  check_channels(a.channels);
  const bool want_params = a.dweight.defined() || a.dbias.defined();
  const int channels = static_cast<int>(a.channels);
  // The block's dweight/dbias sums: a row of 2 * C per warp, as many warps as fit.
  int block = kChannelBlock;
  if (want_params) {
    const size_t per_warp = 2 * static_cast<size_t>(channels) * sizeof(A);
    const int warps = static_cast<int>(std::min<size_t>(kChannelBlock / 32, dynamic_shared_memory_limit() / per_warp));
    TORCH_CHECK(warps >= 1, "ln_ext (CUDA): a channels-first norm's weight gradient over ", channels,
                " channels needs more shared memory than a block has");
    block = 32 * warps;
  }
  const size_t smem = want_params ? static_cast<size_t>(block / 32) * 2 * channels * sizeof(A) : 0;
  with_t_or_float<T>(a.dy.scalar_type(), [&](auto dy_tag) {
    with_t_or_float<T>(a.weight.defined() ? a.weight.scalar_type() : a.x.scalar_type(), [&](auto p_tag) {
      using DY = decltype(dy_tag);
      using P = decltype(p_tag);
      kernels::ChannelBwdParams<T, DY, P> p;
      p.dy = const_ptr<DY>(a.dy);
      p.x = const_ptr<T>(a.x);
      p.mean = const_ptr<A>(a.mean);
      p.rstd = const_ptr<A>(a.rstd);
      p.weight = const_ptr<P>(a.weight);
      p.dx = mut_ptr<T>(a.dx);
      p.positions = a.batch * a.spatial;
      p.spatial = a.spatial;
      p.channels = channels;
      p.weight_offset = static_cast<A>(a.weight_offset);
      auto kernel = a.centered ? kernels::channels_first_bwd_kernel<T, DY, P, true>
                               : kernels::channels_first_bwd_kernel<T, DY, P, false>;
      const int grid = persistent_grid(kernel, ceil_div(p.positions, block), block, smem);
      Partials partials;
      if (want_params) {
        partials = {at::empty({grid, 2, a.channels}, a.x.options().dtype(a.rstd.scalar_type())), grid};
        p.partials = mut_ptr<A>(partials.tensor);
      } else {
        p.partials = nullptr;
      }
      log_launch("channels-first bwd", p.positions, a.channels, grid, block, 0, smem);
      kernel<<<grid, block, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (want_params) launch_param_reduce<A>(partials, a.channels, a.dweight, a.dbias, stream);
    });
  });
}

}  // namespace
}  // namespace cuda_launch

void channel_norm_fwd_cuda_kernel(const ChannelNormFwdArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda_launch::with_input_type(a.x.scalar_type(), [&](auto t) { cuda_launch::launch_channels_fwd<decltype(t)>(a, stream); });
}

void channel_norm_bwd_cuda_kernel(const ChannelNormBwdArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda_launch::with_input_type(a.x.scalar_type(), [&](auto t) { cuda_launch::launch_channels_bwd<decltype(t)>(a, stream); });
}

TORCH_LIBRARY_IMPL(ln_ext, CUDA, m) {
  register_channel_norm_ops<channel_norm_fwd_cuda_kernel, channel_norm_bwd_cuda_kernel>(m);
}

}  // namespace ln_ext
