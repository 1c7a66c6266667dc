"""Every bad input gets a clear error that names the argument and what was expected."""
import pytest
import torch

import ln_ext
from samples import CUDA_ONLY, DEVICES


def _x(dtype=torch.float32, device="cpu", shape=(4, 6)):
    return (torch.randn(shape, device=device) * 2 + 1).to(dtype)


def _p(n=6, dtype=torch.float32, device="cpu"):
    return torch.randn(n, device=device).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalized_shape", [(5,), (4, 5), (3, 4, 6), (6, 4)])
def test_normalized_shape_not_trailing_dims(device, normalized_shape):
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[.*\] must equal the trailing dims of input of shape \[4, 6\]"):
        ln_ext.layer_norm(_x(device=device), normalized_shape)


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_shape_empty(device):
    with pytest.raises(RuntimeError, match="normalized_shape must name at least one dim"):
        ln_ext.layer_norm(_x(device=device), ())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(5,), (1, 6), (6, 1), ()])
def test_param_wrong_shape(device, name, shape):
    p = torch.randn(shape, device=device)
    kwargs = {name: p}
    with pytest.raises(RuntimeError, match=rf"{name} must have shape normalized_shape=\[6\], got \[{', '.join(map(str, shape))}\]"):
        ln_ext.layer_norm(_x(device=device), (6,), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("x_dtype, p_dtype", [
    (torch.float32, torch.float16),   # a reduced-precision parameter with a float32 input
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.int64),
])
def test_param_wrong_dtype(device, name, x_dtype, p_dtype):
    kwargs = {name: _p(dtype=p_dtype, device=device)}
    with pytest.raises(RuntimeError, match=rf"{name} must have the input's dtype \(\w+\).* got \w+"):
        ln_ext.layer_norm(_x(x_dtype, device), (6,), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_weight_and_bias_different_dtypes(device, x_dtype):
    """Each alone is allowed (x's dtype or float32) but they must agree."""
    w = _p(dtype=x_dtype, device=device)
    b = _p(dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="weight and bias must share a dtype"):
        ln_ext.layer_norm(_x(x_dtype, device), (6,), w, b)
    with pytest.raises(RuntimeError, match="weight and bias must share a dtype"):
        ln_ext.layer_norm(_x(x_dtype, device), (6,), b, w)
    # The backward op checks it too: its kernels write dweight and dbias in one dtype.
    x = _x(x_dtype, device)
    _, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(x, [6], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must share a dtype"):
        torch.ops.ln_ext.layer_norm_bwd(torch.randn_like(x), x, mean, rstd, b, w, [True, True, True])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_input_dtype_not_floating(device, dtype):
    x = torch.ones(4, 6, dtype=dtype, device=device)  # the values do not matter, the dtype is refused
    with pytest.raises(RuntimeError, match=r"input must be float32, float64, float16 or bfloat16, got"):
        ln_ext.layer_norm(x, (6,))


def test_bwd_bad_grad_output():
    x = _x()
    _, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(x, [6], None, None, 1e-5)
    bwd = torch.ops.ln_ext.layer_norm_bwd
    with pytest.raises(RuntimeError, match=r"grad_output must have the input's shape \[4, 6\], got \[4, 5\]"):
        bwd(torch.randn(4, 5), x, mean, rstd, None, None, [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_output must have the input's dtype \(Float\) or float32, got Double"):
        bwd(torch.randn(4, 6, dtype=torch.float64), x, mean, rstd, None, None, [True, True, True])
    with pytest.raises(RuntimeError, match="mean and rstd must have the input's leading dims"):
        bwd(torch.randn(4, 6), x, mean[:3], rstd[:3], None, None, [True, True, True])
    with pytest.raises(RuntimeError, match="mean and rstd must be Float"):
        bwd(torch.randn(4, 6), x, mean.double(), rstd.double(), None, None, [True, True, True])


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_param_on_another_device(device, name):
    kwargs = {name: _p(device="cpu")}
    with pytest.raises(RuntimeError, match=rf"{name} is on cpu but input is on cuda"):
        ln_ext.layer_norm(_x(device=device), (6,), **kwargs)
    kwargs = {name: _p(device=device)}
    with pytest.raises(RuntimeError, match=rf"{name} is on cuda:0 but input is on cpu"):
        ln_ext.layer_norm(_x(device="cpu"), (6,), **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cuda_input_without_cuda_kernels(monkeypatch):
    """A build without the CUDA kernels refuses CUDA tensors with a message saying why."""
    import ln_ext.ops

    monkeypatch.setattr(ln_ext.ops, "_HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="input is a CUDA tensor but this ln_ext build has no CUDA kernels"):
        ln_ext.layer_norm(_x(device="cuda"), (6,))


def test_cuda_input_without_cuda_kernels_message(monkeypatch):
    """The same refusal, on any machine: a tensor that claims to be on CUDA."""
    import ln_ext.ops

    class ClaimsCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(ln_ext.ops, "_HAS_CUDA_KERNELS", False)
    x = torch.Tensor._make_subclass(ClaimsCuda, _x())
    with pytest.raises(RuntimeError, match="input is a CUDA tensor but this ln_ext build has no CUDA kernels"):
        ln_ext.layer_norm(x, (6,))
