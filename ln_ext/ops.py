"""Thin Python layer over torch.ops.ln_ext.*: fake kernels, autograd, autocast.

The ops themselves (schemas, CPU and CUDA kernels) are defined in C++ (csrc/).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.ln_ext.*)
from . import reference

_HAS_CUDA_KERNELS: bool = _C.has_cuda_kernels()
_REDUCED = (torch.float16, torch.bfloat16)


def has_cuda_kernels() -> bool:
    """Whether this build of ln_ext holds the CUDA kernels."""
    return _HAS_CUDA_KERNELS


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("ln_ext::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_shape, weight, bias, eps, out_dtype=None):
    k = len(normalized_shape)
    torch._check(
        k >= 1 and tuple(x.shape[x.dim() - k:]) == tuple(normalized_shape),
        lambda: f"ln_ext.layer_norm: normalized_shape={list(normalized_shape)} must equal "
        f"the trailing dims of input of shape {list(x.shape)}",
    )
    y = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    mean = x.new_empty(x.shape[: x.dim() - k], dtype=_stats_dtype(x))
    return y, mean, torch.empty_like(mean)


@torch.library.register_fake("ln_ext::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, mean, rstd, weight, bias, output_mask):
    def none():  # a fresh one per output: outputs of an op must not alias
        return x.new_empty((0,))

    dx = x.new_empty(x.shape) if output_mask[0] else none()
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] and weight is not None else none()
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if output_mask[2] and bias is not None else none()
    return dx, dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs[:5]
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.normalized_ndim = len(normalized_shape)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, rstd)


def _fwd_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    if torch.is_grad_enabled():
        # create_graph=True: a differentiable composite gives second derivatives.
        dx, dw, db = reference.layer_norm_grads(dy, x, ctx.normalized_ndim, weight, ctx.eps)
        dx = dx.to(x.dtype)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
    else:
        dx, dw, db = torch.ops.ln_ext.layer_norm_bwd(dy, x, mean, rstd, weight, bias, [need_x, need_w, need_b])
    grads = (dx if need_x else None, None, dw if need_w else None, db if need_b else None)
    return grads + (None,) * (len(ctx.needs_input_grad) - 4)  # eps, out_dtype


torch.library.register_autograd("ln_ext::layer_norm_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def _autocast_args(input, weight, bias):
    """Mirror autocast's float32 policy for layer_norm on CUDA: the result is float32,
    and reduced-precision parameters are used as float32. The input is read as it is
    (the kernels upcast on chip), so no float32 copy of it is made. CPU autocast
    leaves layer_norm alone, and so do we."""
    if input.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None, weight, bias

    def up(t):
        return t.float() if t is not None and t.dtype in _REDUCED else t

    out_dtype = torch.float32 if input.dtype in _REDUCED else None
    return out_dtype, up(weight), up(bias)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Same signature and results as `torch.nn.functional.layer_norm`."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if input.is_cuda and not _HAS_CUDA_KERNELS:
        raise RuntimeError(
            "ln_ext.layer_norm: input is a CUDA tensor but this ln_ext build has no CUDA "
            "kernels (it was built without nvcc or with a CPU-only torch); reinstall ln_ext "
            "with CUDA_HOME set"
        )
    out_dtype, weight, bias = _autocast_args(input, weight, bias)
    y, _, _ = torch.ops.ln_ext.layer_norm_fwd(input, list(normalized_shape), weight, bias, eps, out_dtype)
    return y
