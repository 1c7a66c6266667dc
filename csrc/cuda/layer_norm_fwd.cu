// CUDA entry of the norm family's forward (kernels/layer_norm_fwd.cuh): picks the launch
// for the x dtype (norm_fwd_launch.cuh, compiled per dtype in layer_norm_fwd_<dtype>.cu)
// on x's device and its current stream, and registers every op of the family for CUDA.
#include "../layer_norm.h"
#include "norm_fwd_launch.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ln_ext {

void norm_fwd_cuda_kernel(const NormFwdArgs& a) {
  // The arguments were checked to share x's device (norm_fwd_impl); launches go to its
  // current stream.
  const c10::cuda::CUDAGuard guard(a.x.device());
  switch (a.x.scalar_type()) {
    case at::kFloat:
      return cuda_launch::launch_fwd_for_input<float>(a);
    case at::kDouble:
      return cuda_launch::launch_fwd_for_input<double>(a);
    case at::kHalf:
      return cuda_launch::launch_fwd_for_input<__half>(a);
    case at::kBFloat16:
      return cuda_launch::launch_fwd_for_input<__nv_bfloat16>(a);
    default:
      TORCH_CHECK(false, "ln_ext (CUDA): unsupported input dtype ", a.x.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(ln_ext, CUDA, m) { register_norm_ops<norm_fwd_cuda_kernel, norm_bwd_cuda_kernel>(m); }

}  // namespace ln_ext
