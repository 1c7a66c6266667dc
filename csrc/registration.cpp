// Every op schema of ln_ext, in one place, and the Python module ln_ext._C.
// Device kernels register themselves in cpu/ and cuda/ (TORCH_LIBRARY_IMPL).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(ln_ext, m) {
  // LayerNorm over the trailing dims named by normalized_shape (DESIGN §2).
  // mean/rstd: x.shape[:-len(normalized_shape)], float32 (float64 for double x).
  // out_dtype: y's dtype; float32 is accepted for float16/bfloat16 x (autocast).
  m.def(
      "layer_norm_fwd(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, ScalarType? out_dtype=None) -> (Tensor y, Tensor mean, Tensor rstd)");
  // Gradients of layer_norm_fwd. Outputs not asked for in output_mask, or whose
  // parameter is None, come back as empty [0] tensors.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, bool[3] output_mask) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

namespace {
bool has_cuda_kernels() {
#ifdef LN_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "ln_ext C++/CUDA ops; the ops themselves live in torch.ops.ln_ext";
  module.def("has_cuda_kernels", &has_cuda_kernels,
             "Whether this build of ln_ext holds the CUDA kernels.");
}
