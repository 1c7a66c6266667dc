"""ln_ext: Layer Normalization (Ba, Kiros & Hinton, 2016) as fused C++/CUDA PyTorch ops."""
from . import distributed as _distributed  # noqa: F401  (registers the DTensor sharding rules)
from .convert import convert_layer_norm
from .modules import LayerNorm, LayerNorm2d, RMSNorm
from .ops import (add_layer_norm, add_rms_norm, has_cuda_kernels, layer_norm, layer_norm_channels_first, rms_norm,
                  rms_norm_channels_first)
from .rnn import (
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LayerNormRNN,
    LayerNormRNNCell,
)

__all__ = [
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "convert_layer_norm",
    "has_cuda_kernels",
    "layer_norm",
    "rms_norm",
    "layer_norm_channels_first",
    "rms_norm_channels_first",
    "add_layer_norm",
    "add_rms_norm",
    "LayerNormRNN",
    "LayerNormLSTM",
    "LayerNormGRU",
    "LayerNormRNNCell",
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
]
