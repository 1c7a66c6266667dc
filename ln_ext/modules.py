"""nn.Module front ends: LayerNorm and RMSNorm, and the converter that swaps them into a model."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import add_layer_norm, add_rms_norm, layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by ln_ext's kernels.

    A subclass, so the constructor, parameters, state_dict keys, init, repr and
    isinstance checks are nn.LayerNorm's; only `forward` differs.

    forward(input) is nn.LayerNorm's. forward(input, residual=r) is the fused add + norm
    of a pre-norm block: h = input + r (in r's dtype: a float32 residual stream beside
    16-bit activations works), returns (layer_norm(h), h) in one pass over memory.
    """

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by ln_ext's kernels (a subclass, as LayerNorm is).

    forward(input) is nn.RMSNorm's; forward(input, residual=r) returns (rms_norm(h), h)
    with h = input + r, as LayerNorm's.
    """

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)


def _converted(module: nn.Module) -> nn.Module:
    """The ln_ext module standing in for a plain nn.LayerNorm / nn.RMSNorm, holding its
    Parameter objects."""
    placeholders = {"device": "meta"}  # the original Parameters are moved in below
    if type(module) is nn.LayerNorm:
        converted = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                              bias=module.bias is not None, **placeholders)
        converted.bias = module.bias
    else:
        converted = RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                            **placeholders)
    converted.weight = module.weight
    converted.train(module.training)
    return converted


def convert_layer_norm(module: nn.Module, rms_norm: bool = True) -> nn.Module:
    """Swap every plain `nn.LayerNorm` in `module` for `ln_ext.LayerNorm` and (unless
    rms_norm=False) every plain `nn.RMSNorm` for `ln_ext.RMSNorm`.

    The new modules hold the same Parameter objects (optimizers keep working) and
    the same training flag; device and dtype are those of the parameters. Subclasses
    are left alone, since their forward may differ. Returns the converted module (a new
    object only when `module` itself is a norm), in the manner of
    `nn.SyncBatchNorm.convert_sync_batchnorm`.

    Note: in eval mode under no_grad, `nn.TransformerEncoderLayer` may take PyTorch's
    fused "fast path", which reads the norm parameters directly and never calls the
    norm modules; disable it (`torch.backends.mha.set_fastpath_enabled(False)`) to
    run ln_ext there.
    """
    if type(module) is nn.LayerNorm or (rms_norm and type(module) is nn.RMSNorm):
        return _converted(module)
    for name, child in module.named_children():
        new_child = convert_layer_norm(child, rms_norm)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
