// The norm family's forward kernels for __nv_bfloat16 x (see norm_fwd_launch.cuh).
#include "norm_fwd_launch.cuh"

namespace ln_ext {
namespace cuda_launch {
template void launch_fwd_for_input<__nv_bfloat16>(const NormFwdArgs&);
}  // namespace cuda_launch
}  // namespace ln_ext
