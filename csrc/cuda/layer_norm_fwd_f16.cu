// The norm family's forward kernels for __half x (see norm_fwd_launch.cuh).
#include "norm_fwd_launch.cuh"

namespace ln_ext {
namespace cuda_launch {
template void launch_fwd_for_input<__half>(const NormFwdArgs&);
}  // namespace cuda_launch
}  // namespace ln_ext
