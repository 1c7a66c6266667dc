"""nn.Module front ends: LayerNorm and the converter that swaps it into a model."""
from __future__ import annotations

import torch
from torch import nn

from .ops import layer_norm


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by ln_ext's kernels.

    A subclass, so the constructor, parameters, state_dict keys, init, repr and
    isinstance checks are nn.LayerNorm's; only `forward` differs.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def convert_layer_norm(module: nn.Module) -> nn.Module:
    """Swap every plain `nn.LayerNorm` in `module` for `ln_ext.LayerNorm`.

    The new modules hold the same Parameter objects (optimizers keep working) and
    the same training flag; device and dtype are those of the parameters. Subclasses
    of nn.LayerNorm are left alone, since their forward may differ. Returns the
    converted module (a new object only when `module` itself is an nn.LayerNorm),
    in the manner of `nn.SyncBatchNorm.convert_sync_batchnorm`.

    Note: in eval mode under no_grad, `nn.TransformerEncoderLayer` may take PyTorch's
    fused "fast path", which reads the norm parameters directly and never calls the
    norm modules; disable it (`torch.backends.mha.set_fastpath_enabled(False)`) to
    run ln_ext there.
    """
    if type(module) is nn.LayerNorm:
        converted = LayerNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device="meta",  # placeholders only: the original Parameters are moved in below
        )
        converted.weight = module.weight
        converted.bias = module.bias
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        new_child = convert_layer_norm(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
