"""Thin Python layer over torch.ops.ln_ext.*: fake kernels and autocast.

The ops themselves (schemas, CPU and CUDA kernels) are defined in C++ (csrc/).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.ln_ext.*)

_HAS_CUDA_KERNELS: bool = _C.has_cuda_kernels()
_REDUCED = (torch.float16, torch.bfloat16)


def has_cuda_kernels() -> bool:
    """Whether this build of ln_ext holds the CUDA kernels."""
    return _HAS_CUDA_KERNELS


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every tensor given (None: absent) is on ref's device, or a RuntimeError names it.

    The fake kernels need this as much as the real ones: the dispatcher sends a call
    whose tensors are on different devices to the kernel of the highest-priority one,
    so a meta-device weight beside a CPU input lands in the fake kernel, which would
    otherwise return an uninitialized CPU tensor.
    """
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"ln_ext.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


@torch.library.register_fake("ln_ext::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_shape, weight, bias, eps, out_dtype=None):
    check_same_device("layer_norm", "input", x, weight=weight, bias=bias)
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
    check_same_device("layer_norm", "input", x, grad_output=dy, mean=mean, rstd=rstd, weight=weight, bias=bias)
    def none():  # a fresh one per output: outputs of an op must not alias
        return x.new_empty((0,))

    dx = x.new_empty(x.shape) if output_mask[0] else none()
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] and weight is not None else none()
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if output_mask[2] and bias is not None else none()
    return dx, dw, db


# Autograd of layer_norm_fwd is registered in C++ (csrc/layer_norm_autograd.cpp).


def _autocast_args(input, weight, bias):
    """Mirror autocast's float32 policy for layer_norm on CUDA: the result is float32,
    and reduced-precision parameters are used as float32. The input is read as it is
    (the kernels upcast on chip), so no float32 copy of it is made. CPU autocast
    leaves layer_norm alone, and so do we."""
    if not input.is_cuda or not torch.is_autocast_enabled("cuda"):
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
    if type(input) is torch.Tensor and not torch.compiler.is_compiling():
        # Eager plain tensors: the same op, called from C++ (saves ~3 us a call).
        return _C.layer_norm(input, normalized_shape, weight, bias, eps, out_dtype)
    y, _, _ = torch.ops.ln_ext.layer_norm_fwd(input, list(normalized_shape), weight, bias, eps, out_dtype)
    return y
