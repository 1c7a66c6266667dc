// Whether a kernel's code can run thread-block clusters, from its cudaFuncAttributes.
// Plain C++ (no CUDA headers), so that the decision is tested on any machine
// (tests/test_cuda_launch_host.py through ln_ext._C).
#pragma once

namespace ln_ext {
namespace cuda_launch {

// The cluster kernels' bodies use clusters only where they were compiled for sm_90 or
// later (kernels/platform.cuh: elsewhere the cluster operations trap). ptxVersion is the
// virtual architecture the body came from. binaryVersion is not: a build whose newest
// target is PTX for compute_80 (TORCH_CUDA_ARCH_LIST="8.0+PTX"), run on an H100, is
// JIT-compiled to sm_90 and reports binaryVersion 90 for a body compiled with
// __CUDA_ARCH__ = 800, whose cluster operations would trap and kill the context.
// A cubin from before CUDA 3.0 reports ptxVersion 0: no clusters either.
constexpr bool kernel_has_cluster_code(int ptx_version, int binary_version) {
  return ptx_version >= 90 && binary_version >= 90;
}

}  // namespace cuda_launch
}  // namespace ln_ext
