"""Thin Python layer over torch.ops.ln_ext.*: the public functions of the norm family
(layer_norm, rms_norm, add_layer_norm, add_rms_norm), fake kernels and autocast.

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


def _stats_shape(op: str, x, normalized_shape):
    k = len(normalized_shape)
    torch._check(
        k >= 1 and tuple(x.shape[x.dim() - k:]) == tuple(normalized_shape),
        lambda: f"ln_ext.{op}: normalized_shape={list(normalized_shape)} must equal "
        f"the trailing dims of input of shape {list(x.shape)}",
    )
    return x.shape[: x.dim() - k]


def _check_weight_offset(op, weight_offset, weight):
    torch._check(weight_offset == 0 or weight is not None,
                 lambda: f"ln_ext.{op}: weight_offset={weight_offset} needs a weight (the gain is weight_offset + weight)")


def _residual_dtype(x, residual, residual_dtype):
    """The dtype of h = x + residual (the fake kernels' view of csrc/layer_norm.cpp)."""
    h_dtype = residual_dtype or residual.dtype
    torch._check(residual.shape == x.shape,
                 lambda: f"ln_ext: residual must have the input's shape {list(x.shape)}, got {list(residual.shape)}")
    return h_dtype


@torch.library.register_fake("ln_ext::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_shape, weight, bias, eps, out_dtype=None, weight_offset=0.0):
    check_same_device("layer_norm", "input", x, weight=weight, bias=bias)
    _check_weight_offset("layer_norm", weight_offset, weight)
    mean = x.new_empty(_stats_shape("layer_norm", x, normalized_shape), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), mean, torch.empty_like(mean)


@torch.library.register_fake("ln_ext::rms_norm_fwd")
def _rms_norm_fwd_fake(x, normalized_shape, weight, eps, out_dtype=None, weight_offset=0.0):
    check_same_device("rms_norm", "input", x, weight=weight)
    _check_weight_offset("rms_norm", weight_offset, weight)
    rstd = x.new_empty(_stats_shape("rms_norm", x, normalized_shape), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), rstd


@torch.library.register_fake("ln_ext::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(x, residual, normalized_shape, weight, bias, eps, residual_dtype=None, out_dtype=None,
                             weight_offset=0.0):
    check_same_device("add_layer_norm", "input", x, residual=residual, weight=weight, bias=bias)
    _check_weight_offset("add_layer_norm", weight_offset, weight)
    h = x.new_empty(x.shape, dtype=_residual_dtype(x, residual, residual_dtype))
    mean = x.new_empty(_stats_shape("add_layer_norm", x, normalized_shape), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), h, mean, torch.empty_like(mean)


@torch.library.register_fake("ln_ext::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, normalized_shape, weight, eps, residual_dtype=None, out_dtype=None,
                           weight_offset=0.0):
    check_same_device("add_rms_norm", "input", x, residual=residual, weight=weight)
    _check_weight_offset("add_rms_norm", weight_offset, weight)
    h = x.new_empty(x.shape, dtype=_residual_dtype(x, residual, residual_dtype))
    rstd = x.new_empty(_stats_shape("add_rms_norm", x, normalized_shape), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), h, rstd


def _bwd_outputs(x, params, output_mask):
    """dx and one gradient per parameter; outputs not asked for, or without their parameter,
    are fresh empty [0] tensors (outputs of an op must not alias one another)."""
    def none():
        return x.new_empty((0,))

    dx = x.new_empty(x.shape) if output_mask[0] else none()
    return (dx,) + tuple(torch.empty_like(p, memory_format=torch.contiguous_format) if asked and p is not None
                         else none() for p, asked in zip(params, output_mask[1:]))


@torch.library.register_fake("ln_ext::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, mean, rstd, weight, bias, output_mask, grad_h=None, weight_offset=0.0):
    check_same_device("layer_norm", "input", x, grad_output=dy, mean=mean, rstd=rstd, weight=weight, bias=bias,
                      grad_h=grad_h)
    return _bwd_outputs(x, (weight, bias), output_mask)


@torch.library.register_fake("ln_ext::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, rstd, weight, output_mask, grad_h=None, weight_offset=0.0, eps=None):
    check_same_device("rms_norm", "input", x, grad_output=dy, rstd=rstd, weight=weight, grad_h=grad_h)
    return _bwd_outputs(x, (weight,), output_mask)


# Autograd of the forward ops is registered in C++ (csrc/layer_norm_autograd.cpp).


def _autocast_args(input, *params):
    """Mirror autocast's float32 policy for layer_norm and rms_norm on CUDA: the result is
    float32, and reduced-precision parameters are used as float32. The input is read as it
    is (the kernels upcast on chip), so no float32 copy of it is made. CPU autocast leaves
    both alone, and so do we. Returns (out_dtype, *params)."""
    if not input.is_cuda or not torch.is_autocast_enabled("cuda"):
        return (None, *params)

    def up(t):
        return t.float() if t is not None and t.dtype in _REDUCED else t

    out_dtype = torch.float32 if input.dtype in _REDUCED else None
    return (out_dtype, *(up(p) for p in params))


def _shape(normalized_shape):
    """An int as [int]; a sequence as it is (the C++ and torch.ops calls take any)."""
    return [normalized_shape] if isinstance(normalized_shape, int) else normalized_shape


# Whether dynamo is tracing: then the ops go through torch.ops (a C++ function bound with
# pybind11 is opaque to it). Eager, they are called from C++ (saves ~3 us a call).
_is_compiling = torch.compiler.is_compiling


def _check_cuda_build(input: torch.Tensor, name: str) -> None:
    if input.is_cuda and not _HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"ln_ext.{name}: input is a CUDA tensor but this ln_ext build has no CUDA "
            "kernels (it was built without nvcc or with a CPU-only torch); reinstall ln_ext "
            "with CUDA_HOME set"
        )


def _rms_eps(eps, input):
    """eps=None: torch.finfo(input.dtype).eps, as torch's rms_norm (a non-float input is
    refused by the op itself, naming it)."""
    if eps is not None:
        return eps
    return torch.finfo(input.dtype).eps if input.is_floating_point() else 0.0


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Same signature and results as `torch.nn.functional.layer_norm`.

    weight_offset: the gain is weight_offset + weight (a zero-centered gain: Gemma's
    1 + w), read by the kernels; the gradient goes to weight. out_dtype: the result's
    dtype, the input's (default) or float32 beside a float16/bfloat16 input, written by
    the kernel (no extra pass); given, it also turns off the CUDA autocast policy."""
    if input.is_cuda:
        _check_cuda_build(input, "layer_norm")
        if out_dtype is None:
            out_dtype, weight, bias = _autocast_args(input, weight, bias)
    shape = _shape(normalized_shape)
    if type(input) is torch.Tensor and not _is_compiling():
        return _C.layer_norm(input, shape, weight, bias, eps, out_dtype, weight_offset)
    return torch.ops.ln_ext.layer_norm_fwd(input, shape, weight, bias, eps, out_dtype, weight_offset)[0]


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Same signature and results as `torch.nn.functional.rms_norm`: y = x / sqrt(mean(x^2)
    + eps) * weight over the trailing dims; eps=None is torch.finfo(input.dtype).eps.
    weight_offset and out_dtype as layer_norm's."""
    if input.is_cuda:
        _check_cuda_build(input, "rms_norm")
        if out_dtype is None:
            out_dtype, weight = _autocast_args(input, weight)
    shape = _shape(normalized_shape)
    if eps is None:
        eps = _rms_eps(eps, input)
    if type(input) is torch.Tensor and not _is_compiling():
        return _C.rms_norm(input, shape, weight, eps, out_dtype, weight_offset)
    return torch.ops.ln_ext.rms_norm_fwd(input, shape, weight, eps, out_dtype, weight_offset)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual_dtype: Optional[torch.dtype] = None,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and y = layer_norm(h) in one pass; returns (y, h).

    h is computed and returned in `residual_dtype` (default: the residual's dtype; x's, or
    float32 beside a 16-bit x: a float32 residual stream); y has x's dtype (float32 under
    CUDA autocast, as layer_norm). Gradients reach x and residual. weight_offset and
    out_dtype as layer_norm's."""
    if x.is_cuda:
        _check_cuda_build(x, "add_layer_norm")
        if out_dtype is None:
            out_dtype, weight, bias = _autocast_args(x, weight, bias)
    shape = _shape(normalized_shape)
    if type(x) is torch.Tensor and type(residual) is torch.Tensor and not _is_compiling():
        return _C.add_layer_norm(x, residual, shape, weight, bias, eps, residual_dtype, out_dtype, weight_offset)
    y, h, _, _ = torch.ops.ln_ext.add_layer_norm_fwd(x, residual, shape, weight, bias, eps, residual_dtype, out_dtype,
                                                     weight_offset)
    return y, h


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    residual_dtype: Optional[torch.dtype] = None,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and y = rms_norm(h) in one pass; returns (y, h), dtypes as
    add_layer_norm (eps=None: torch.finfo(x.dtype).eps, as rms_norm); weight_offset and
    out_dtype as layer_norm's."""
    if x.is_cuda:
        _check_cuda_build(x, "add_rms_norm")
        if out_dtype is None:
            out_dtype, weight = _autocast_args(x, weight)
    shape = _shape(normalized_shape)
    if eps is None:
        eps = _rms_eps(eps, x)
    if type(x) is torch.Tensor and type(residual) is torch.Tensor and not _is_compiling():
        return _C.add_rms_norm(x, residual, shape, weight, eps, residual_dtype, out_dtype, weight_offset)
    y, h, _ = torch.ops.ln_ext.add_rms_norm_fwd(x, residual, shape, weight, eps, residual_dtype, out_dtype,
                                                weight_offset)
    return y, h


# ---------------------------------------------------------------- channels-first norms

def _channels_first_stats_shape(op, x, weight, bias):
    torch._check(x.dim() >= 2, lambda: f"ln_ext.{op}: input must be [batch, channels, *spatial] (at least 2 dims), "
                 f"got shape {list(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        torch._check(p is None or tuple(p.shape) == (x.shape[1],),
                     lambda: f"ln_ext.{op}: {name} must have shape normalized_shape=[{x.shape[1]}], got {list(p.shape)}")
    return x.shape[:1] + x.shape[2:]


@torch.library.register_fake("ln_ext::channels_first_layer_norm_fwd")
def _channels_first_layer_norm_fwd_fake(x, weight, bias, eps, weight_offset=0.0, out_dtype=None):
    op = "layer_norm_channels_first"
    check_same_device(op, "input", x, weight=weight, bias=bias)
    _check_weight_offset(op, weight_offset, weight)
    mean = x.new_empty(_channels_first_stats_shape(op, x, weight, bias), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), mean, torch.empty_like(mean)


@torch.library.register_fake("ln_ext::channels_first_rms_norm_fwd")
def _channels_first_rms_norm_fwd_fake(x, weight, eps, weight_offset=0.0, out_dtype=None):
    op = "rms_norm_channels_first"
    check_same_device(op, "input", x, weight=weight)
    _check_weight_offset(op, weight_offset, weight)
    rstd = x.new_empty(_channels_first_stats_shape(op, x, weight, None), dtype=_stats_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), rstd


@torch.library.register_fake("ln_ext::channels_first_layer_norm_bwd")
def _channels_first_layer_norm_bwd_fake(dy, x, mean, rstd, weight, bias, output_mask, weight_offset=0.0):
    check_same_device("layer_norm_channels_first", "input", x, grad_output=dy, mean=mean, rstd=rstd, weight=weight,
                      bias=bias)
    return _bwd_outputs(x, (weight, bias), output_mask)


@torch.library.register_fake("ln_ext::channels_first_rms_norm_bwd")
def _channels_first_rms_norm_bwd_fake(dy, x, rstd, weight, output_mask, weight_offset=0.0, eps=None):
    check_same_device("rms_norm_channels_first", "input", x, grad_output=dy, rstd=rstd, weight=weight)
    return _bwd_outputs(x, (weight,), output_mask)


def layer_norm_channels_first(
    input: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LayerNorm over dim 1 of input: [B, C, *spatial] (channels-first: ConvNeXt, timm's
    LayerNorm2d), read and written as it is laid out (no permute copies); weight/bias: [C].
    Equals F.layer_norm(input.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1);
    weight_offset and out_dtype as layer_norm's."""
    if input.is_cuda:
        _check_cuda_build(input, "layer_norm_channels_first")
        if out_dtype is None:
            out_dtype, weight, bias = _autocast_args(input, weight, bias)
    if type(input) is torch.Tensor and not _is_compiling():
        return _C.layer_norm_channels_first(input, weight, bias, eps, weight_offset, out_dtype)
    return torch.ops.ln_ext.channels_first_layer_norm_fwd(input, weight, bias, eps, weight_offset, out_dtype)[0]


def rms_norm_channels_first(
    input: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    weight_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """RMSNorm over dim 1 of input: [B, C, *spatial] (timm's RmsNorm2d), as
    layer_norm_channels_first."""
    if input.is_cuda:
        _check_cuda_build(input, "rms_norm_channels_first")
        if out_dtype is None:
            out_dtype, weight = _autocast_args(input, weight)
    if type(input) is torch.Tensor and not _is_compiling():
        return _C.rms_norm_channels_first(input, weight, eps, weight_offset, out_dtype)
    return torch.ops.ln_ext.channels_first_rms_norm_fwd(input, weight, eps, weight_offset, out_dtype)[0]
