// The norm family's backward kernels for a double norm input (see norm_bwd_launch.cuh).
#include "norm_bwd_launch.cuh"

namespace ln_ext {
namespace cuda_launch {
template void launch_bwd_for_input<double>(const NormBwdArgs&);
}  // namespace cuda_launch
}  // namespace ln_ext
