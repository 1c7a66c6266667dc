"""Pure-PyTorch references of the paper's equations, in whatever dtype they are given.

Tests compare the kernels against these in float64; ops.py uses `layer_norm_grads`
as the differentiable path for second derivatives.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _norm_dims(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(x.dim() - len(normalized_shape), x.dim()))


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Eq. 3: mean and (biased) variance over the trailing dims, then gain and bias."""
    dims = _norm_dims(x, normalized_shape)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def layer_norm_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    normalized_ndim: int,
    weight: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of `layer_norm`, written with differentiable ops.

    Computed in float32 or better; the caller casts to the tensors' dtypes.
    dweight/dbias are over the normalized dims (None weight counts as ones).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dy = x.to(acc), dy.to(acc)
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    row_dims = tuple(range(x.dim() - normalized_ndim))
    mean = x.mean(dim=dims, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(dim=dims, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * weight.to(acc)
    dx = rstd * (g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True))
    dweight, dbias = dy * xhat, dy
    if row_dims:  # sum(dim=()) would sum over every dim, not over none
        dweight, dbias = dweight.sum(dim=row_dims), dbias.sum(dim=row_dims)
    return dx, dweight, dbias
