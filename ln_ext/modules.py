"""nn.Module front ends: LayerNorm and RMSNorm (the converter is ln_ext/convert.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import add_layer_norm, add_rms_norm, layer_norm, layer_norm_channels_first, rms_norm


class _WeightOffset:
    """weight_offset for the norm modules: the gain is weight_offset + weight (Gemma's
    zero-centered 1 + w), so reset_parameters starts the weight at 1 - weight_offset
    (a gain of 1)."""

    weight_offset: float = 0.0

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight_offset != 0 and self.weight is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.weight_offset)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset != 0 else ""
        return super().extra_repr() + offset


class LayerNorm(_WeightOffset, nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by ln_ext's kernels.

    A subclass, so the constructor, parameters, state_dict keys, init, repr and
    isinstance checks are nn.LayerNorm's; only `forward` differs. weight_offset (keyword,
    default 0) makes the gain weight_offset + weight.

    forward(input) is nn.LayerNorm's. forward(input, residual=r) is the fused add + norm
    of a pre-norm block: h = input + r (in r's dtype: a float32 residual stream beside
    16-bit activations works), returns (layer_norm(h), h) in one pass over memory.
    """

    def __init__(self, *args, weight_offset: float = 0.0, **kwargs):
        self.weight_offset = float(weight_offset)  # read by reset_parameters in nn.LayerNorm.__init__
        super().__init__(*args, **kwargs)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                              weight_offset=self.weight_offset)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              weight_offset=self.weight_offset)


class RMSNorm(_WeightOffset, nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by ln_ext's kernels (a subclass, as LayerNorm is), with
    weight_offset as LayerNorm's.

    forward(input) is nn.RMSNorm's; forward(input, residual=r) returns (rms_norm(h), h)
    with h = input + r, as LayerNorm's.
    """

    def __init__(self, *args, weight_offset: float = 0.0, **kwargs):
        self.weight_offset = float(weight_offset)
        super().__init__(*args, **kwargs)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps, weight_offset=self.weight_offset)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                            weight_offset=self.weight_offset)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW (or any [B, C, *spatial]) tensor, as timm's
    LayerNorm2d and ConvNeXt use it, read in place by ln_ext's channels-first kernels (no
    permute copies). Parameters `weight`, `bias` of shape [C]: the same state_dict as
    timm.layers.LayerNorm2d."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (num_channels,)
        self.eps = eps
        self.elementwise_affine = affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory)) if affine else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels_first(input, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, affine={self.elementwise_affine}"
