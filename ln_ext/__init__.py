"""ln_ext: Layer Normalization (Ba, Kiros & Hinton, 2016) as fused C++/CUDA PyTorch ops."""
from .modules import LayerNorm, convert_layer_norm
from .ops import has_cuda_kernels, layer_norm

__all__ = ["LayerNorm", "convert_layer_norm", "has_cuda_kernels", "layer_norm"]
