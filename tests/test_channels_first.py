"""Channels-first LayerNorm / RMSNorm (ln_ext.layer_norm_channels_first, rms_norm_channels_first,
LayerNorm2d): over dim 1 of [B, C, *spatial], against float64 and torch's own same-dtype permute
path (timm's LayerNorm2d), every gradient, weight_offset, C = 1 exact, errors, compile, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import ln_ext
from samples import DEVICES, REDUCED

SHAPES = [(2, 5, 7, 3), (3, 1, 4, 4), (2, 2, 3), (1, 96, 9, 9), (4, 7), (2, 3, 2, 2, 3), (1, 64, 130), (0, 4, 3, 3)]
# (x dtype, parameter dtype): parameters as x's, or float32 beside 16-bit x.
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


def torch_permute_path(x, weight, bias, eps, centered, offset=0.0):
    """What timm's LayerNorm2d / RmsNorm2d do: move C last, norm, move it back."""
    gain = None if weight is None else weight + offset
    xl = x.movedim(1, -1)
    y = F.layer_norm(xl, (x.shape[1],), gain, bias, eps) if centered else F.rms_norm(xl, (x.shape[1],), gain, eps)
    return y.movedim(-1, 1)


def ours(x, weight, bias, eps, centered, offset=0.0):
    if centered:
        return ln_ext.layer_norm_channels_first(x, weight, bias, eps, weight_offset=offset)
    return ln_ext.rms_norm_channels_first(x, weight, eps, weight_offset=offset)


def run(fn, x, w, b, dy):
    """y and the gradients of x, w, b (None for an absent b, or an empty x)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    if not x.numel():
        return y.detach(), (None,) * 3
    present = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad(y, present, dy.to(y.dtype)))
    return y.detach(), tuple(None if t is None else next(it) for t in leaves)


def rel_err(got, want):
    if got is None or want is None or want.numel() == 0:
        return 0.0
    assert not torch.isnan(got).any()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_against_float64_and_torch_permute_path(device, centered, x_dtype, p_dtype):
    """y and the gradients of x, weight (and bias): ours no further from float64 than 2x torch's
    same-dtype permute path plus a few ulps, on ordinary and ill-conditioned positions."""
    g = torch.Generator().manual_seed(0)
    ulp = torch.finfo(x_dtype).eps
    for shape in SHAPES:
        for offset, scale, off in [(0.0, 1.0, 0.5), (1.0, 1.0, 0.5), (0.0, 1e-3, 50.0)]:
            if x_dtype == torch.float64 and scale != 1.0:
                continue  # torch's float64 loses |mean| / spread ulps there: no reference
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + off).to(x_dtype).to(device)
            C = shape[1]
            w = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + (1 - offset)).to(p_dtype).to(device)
            b = torch.randn(C, generator=g, dtype=torch.float64).to(p_dtype).to(device) if centered else None
            dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
            fn = lambda x, w, b: ours(x, w, b, 1e-6, centered, offset)  # noqa: E731
            ref = lambda x, w, b: torch_permute_path(x, w, b, 1e-6, centered, offset)  # noqa: E731
            y, grads = run(fn, x, w, b, dy)
            assert y.dtype == x_dtype and y.shape == x.shape
            exact, exact_grads = run(ref, x.double(), w.double(), b.double() if b is not None else None, dy)
            theirs, their_grads = run(ref, x, w.to(x_dtype), b.to(x_dtype) if b is not None else None, dy)
            what = f"{shape} offset={offset} scale={scale}"
            if x_dtype == torch.float64:
                # The reference is torch's own float64: a tolerance on the terms' scale stands in
                # for "2x its error" (C = 2 rows cancel most of dx, in both).
                for got, want in zip((y,) + grads, (exact,) + exact_grads):
                    if got is not None and want is not None and want.numel():
                        assert (got - want).abs().max() <= 1e-10 * (1 + want.abs().max()), what
                continue
            assert rel_err(y, exact) <= 2 * rel_err(theirs, exact) + 8 * ulp, "y " + what
            for name, got, want, their in zip(("dx", "dweight", "dbias"), grads, exact_grads, their_grads):
                if got is None:
                    continue
                assert got.dtype == (x_dtype if name == "dx" else p_dtype)
                floor = 8 * ulp if x_dtype not in REDUCED else 16 * ulp
                assert rel_err(got, want) <= 2 * rel_err(their, want) + floor, f"{name} {what}"


def test_single_channel_is_exact():
    """C = 1: y = bias, dx = 0 and dweight = 0 exactly (x - mean is 0 for one element)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = (torch.randn(3, 1, 5, 5) * 100 + 7).to(dtype).requires_grad_()
        w, b = torch.randn(1, dtype=dtype, requires_grad=True), torch.randn(1, dtype=dtype, requires_grad=True)
        y = ln_ext.layer_norm_channels_first(x, w, b)
        assert torch.equal(y, b.detach().view(1, 1, 1, 1).expand_as(y))
        dx, dw, _ = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
        assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_non_contiguous_and_channels_last_inputs():
    x = torch.randn(2, 6, 5, 4)
    w, b = torch.randn(6), torch.randn(6)
    want = torch_permute_path(x.double(), w.double(), b.double(), 1e-6, True)
    for variant in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.randn(2, 12, 5, 4)[:, ::2].copy_(x)):
        torch.testing.assert_close(ln_ext.layer_norm_channels_first(variant, w, b).double(), want, atol=1e-5,
                                   rtol=1e-5)


def test_gradients_reproducible_across_thread_counts(num_threads):
    x = torch.randn(8, 32, 20, 20, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    dy = torch.randn(8, 32, 20, 20)
    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(torch.autograd.grad(ln_ext.layer_norm_channels_first(x, w, b), (x, w, b), dy))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_bad_arguments_are_named():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ln_ext.layer_norm_channels_first(x, torch.ones(3))
    with pytest.raises(RuntimeError, match="input must be float32"):
        ln_ext.layer_norm_channels_first(x.long(), torch.ones(4))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ln_ext.rms_norm_channels_first(torch.randn(4), None)
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        ln_ext.layer_norm_channels_first(x, torch.ones(4, device="meta"))
    with pytest.raises(RuntimeError, match="weight_offset=1.*needs a weight"):
        ln_ext.rms_norm_channels_first(x, None, weight_offset=1.0)


def test_gradcheck_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ln_ext.layer_norm_channels_first(*t, weight_offset=0.5), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w: ln_ext.rms_norm_channels_first(x, w), (x, w))
    torch.library.opcheck(torch.ops.ln_ext.channels_first_layer_norm_fwd.default, (x, w, b, 1e-6, 0.0, None))
    torch.library.opcheck(torch.ops.ln_ext.channels_first_rms_norm_fwd.default, (x, w, 1e-6, 1.0, None))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), ln_ext.LayerNorm2d(8), torch.nn.GELU())
    inp = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(inp), model(inp))


def test_layer_norm_2d_is_timms():
    timm_layers = pytest.importorskip("timm.layers")
    ours_m, theirs = ln_ext.LayerNorm2d(16), timm_layers.LayerNorm2d(16)
    with torch.no_grad():
        ours_m.weight.normal_()
        ours_m.bias.normal_()
    theirs.load_state_dict(ours_m.state_dict())
    ours_m.load_state_dict(theirs.state_dict())
    assert ours_m.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 16, 7, 5)
    torch.testing.assert_close(ours_m(x), theirs(x), atol=1e-5, rtol=1e-5)
