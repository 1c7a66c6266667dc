// CUDA entry of the norm family's backward (kernels/layer_norm_bwd.cuh): picks the launch
// for the dtype of the norm's input (norm_bwd_launch.cuh, compiled per dtype in
// layer_norm_bwd_<dtype>.cu) on its device and current stream.
#include "../layer_norm.h"
#include "norm_bwd_launch.cuh"

#include <c10/cuda/CUDAGuard.h>

namespace ln_ext {

void norm_bwd_cuda_kernel(const NormBwdArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());  // arguments checked by norm_bwd_impl
  switch (a.x.scalar_type()) {
    case at::kFloat:
      return cuda_launch::launch_bwd_for_input<float>(a);
    case at::kDouble:
      return cuda_launch::launch_bwd_for_input<double>(a);
    case at::kHalf:
      return cuda_launch::launch_bwd_for_input<__half>(a);
    case at::kBFloat16:
      return cuda_launch::launch_bwd_for_input<__nv_bfloat16>(a);
    default:
      TORCH_CHECK(false, "ln_ext (CUDA): unsupported input dtype ", a.x.scalar_type());
  }
}

}  // namespace ln_ext
