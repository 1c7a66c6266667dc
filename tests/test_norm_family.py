"""RMSNorm and fused residual-add norms (ln_ext.rms_norm, add_layer_norm, add_rms_norm and the
modules): results and gradients against float64 references and torch's own ops, every
dtype combination, odd N and N = 1, errors, autograd, compile and export."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ln_ext
from samples import (DEVICES, REDUCED, TOLERANCES, Tol, assert_close_scaled, make_sample, run_with_cpu_isa_cap,
                     sample_inputs)

OPS = torch.ops.ln_ext


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _ref_norm(h, normalized_shape, weight, bias, eps, centered):
    """The norm of h in float64 (LayerNorm or RMSNorm)."""
    dims = tuple(range(h.dim() - len(normalized_shape), h.dim()))
    u = h - h.mean(dims, keepdim=True) if centered else h
    y = u * torch.rsqrt(u.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def reference(x, residual, normalized_shape, weight, bias, eps, centered, dy, dh=None, residual_dtype=None):
    """Float64 y, h (with a residual: h = x + residual rounded to the stream's dtype, as the
    op returns it) and the gradients of every input, from autograd."""
    leaves = [_leaf(t.double()) if t is not None else None for t in (x, residual, weight, bias)]
    xd, rd, wd, bd = leaves
    h = None
    if residual is not None:
        h_dtype = residual_dtype or residual.dtype
        # The op rounds h once to its dtype; the reference normalizes that same h.
        h = xd + rd
        h = h + ((h.detach().to(h_dtype).double()) - h.detach())
        u = h
    else:
        u = xd
    y = _ref_norm(u, normalized_shape, wd, bd, eps, centered)
    outs, grads_in = [y], [dy.double()]
    if h is not None and dh is not None:
        outs.append(h)
        grads_in.append(dh.double())
    diff = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, diff, grads_in, allow_unused=True)
    it = iter(grads)
    g = [next(it) if t is not None else None for t in leaves]
    return y.detach(), (h.detach() if h is not None else None), g


def _check_grad(got, want, like, tol, scale, what):
    if like is None:
        return
    assert got is not None and got.dtype == like.dtype, f"{what}: dtype {None if got is None else got.dtype}"
    assert_close_scaled(got, want, tol, scale=scale, what=what)


# (x dtype, residual dtype, residual_dtype argument, parameter dtype)
ADD_COMBOS = [
    (torch.float32, torch.float32, None, torch.float32),
    (torch.float64, torch.float64, None, torch.float64),
    (torch.bfloat16, torch.bfloat16, None, torch.bfloat16),
    (torch.bfloat16, torch.float32, None, torch.bfloat16),   # a float32 residual stream
    (torch.bfloat16, torch.float32, None, torch.float32),
    (torch.float16, torch.float32, None, torch.float16),
    (torch.float16, torch.float16, torch.float32, torch.float32),  # the stream promoted to float32
    (torch.bfloat16, torch.bfloat16, None, torch.float32),
]
ROW_SHAPES = [(3, 1), (5, 2), (7, 7), (37, 33), (3, 127), (7, 1000), (3, 1025), (2, 4097)]


def _name(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_float64_reference(device):
    """Every LayerNorm sample input (shapes, layouts, parameters, dtypes) through rms_norm:
    y, dx and dweight against float64."""
    failures, count = [], 0
    for s in sample_inputs(device):
        count += 1
        fwd_tol, bwd_tol = TOLERANCES[s.x.dtype]
        try:
            x, w = _leaf(s.x), _leaf(s.weight)
            y = ln_ext.rms_norm(x, s.normalized_shape, w, s.eps)
            assert y.dtype == s.x.dtype and y.shape == s.x.shape
            want_y, _, (dx_ref, _, dw_ref, _) = reference(s.x, None, s.normalized_shape, s.weight, None, s.eps, False, s.dy)
            assert_close_scaled(y, want_y, fwd_tol, what="y")
            if s.x.numel() == 0:
                continue
            grads = torch.autograd.grad(y, [t for t in (x, w) if t is not None], s.dy)
            dims = tuple(range(s.x.dim() - len(s.normalized_shape), s.x.dim()))
            rstd = torch.rsqrt(s.x.double().square().mean(dims, keepdim=True) + s.eps)
            g = s.dy.double() * (s.weight.double() if s.weight is not None else 1)
            _check_grad(grads[0], dx_ref, s.x, bwd_tol, float((g.abs() * rstd).max()), "dx")
            if w is not None:
                term = float((s.dy.double() * s.x.double() * rstd).abs().max())
                _check_grad(grads[1], dw_ref, s.weight, bwd_tol, math.sqrt(max(s.rows, 1)) * term, "dweight")
        except Exception as e:  # collect them all
            failures.append(f"{s.name}: {type(e).__name__}: {e}")
    assert count > 100
    assert not failures, f"{len(failures)} of {count} samples failed:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_torch(device):
    """Same values as F.rms_norm, eps=None included (torch.finfo(dtype).eps), in float32 and
    float64. (torch's CPU rms_norm of 16-bit inputs loses up to ~25% on small rows, as it
    works in the input's precision: there the float64 reference and the accuracy test next
    to torch's error decide.)"""
    for s in sample_inputs(device, dtypes=[torch.float32, torch.float64], small=True):
        if s.weight is not None and s.weight.dtype != s.x.dtype:
            continue  # F.rms_norm keeps x's dtype there too, but through another path
        fwd_tol, _ = TOLERANCES[s.x.dtype]
        for eps in (None, 1e-5):
            want = F.rms_norm(s.x, list(s.normalized_shape), s.weight, eps)
            got = ln_ext.rms_norm(s.x, s.normalized_shape, s.weight, eps)
            assert got.dtype == want.dtype
            assert_close_scaled(got, want.double(), Tol(8 * fwd_tol.atol, 8 * fwd_tol.rtol), what=s.name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("centered", [True, False], ids=["add_layer_norm", "add_rms_norm"])
def test_add_norm_matches_float64_reference(device, centered):
    """y, h and the gradients of x, residual, weight and bias, with gradients flowing in
    through both y and h (a pre-norm block uses h downstream), every dtype combination."""
    failures, count = [], 0
    for x_dtype, r_dtype, residual_dtype, p_dtype in ADD_COMBOS:
        for M, N in ROW_SHAPES:
            for weight, bias in ((True, True), (False, False), (True, False)):
                count += 1
                name = f"{_name(x_dtype)}+{_name(r_dtype)}->{residual_dtype} params={_name(p_dtype)} [{M},{N}] w={weight} b={bias}"
                s = make_sample(name, (M, N), dtype=x_dtype, device=device, param_dtype=p_dtype, weight=weight,
                                bias=bias and centered, variant=count)
                residual = (torch.randn(M, N, device=device) * 2 - 1).to(r_dtype)
                h_dtype = residual_dtype or r_dtype
                dh = torch.randn(M, N, device=device).to(h_dtype)
                try:
                    x, r, w, b = (_leaf(t) for t in (s.x, residual, s.weight, s.bias))
                    if centered:
                        y, h = ln_ext.add_layer_norm(x, r, (N,), w, b, s.eps, residual_dtype=residual_dtype)
                    else:
                        y, h = ln_ext.add_rms_norm(x, r, (N,), w, s.eps, residual_dtype=residual_dtype)
                    assert y.dtype == x_dtype and h.dtype == h_dtype, (y.dtype, h.dtype)
                    want_y, want_h, want_g = reference(s.x, residual, (N,), s.weight, s.bias, s.eps, centered, s.dy, dh,
                                                       residual_dtype)
                    fwd_tol, bwd_tol = TOLERANCES[x_dtype]
                    torch.testing.assert_close(h.double(), want_h, atol=0, rtol=0, msg="h")  # rounded once, the same
                    assert_close_scaled(y, want_y, fwd_tol, what="y")
                    leaves = [t for t in (x, r, w, b) if t is not None]
                    grads = list(torch.autograd.grad([y, h], leaves, [s.dy, dh]))
                    g = {id(t): gr for t, gr in zip(leaves, grads)}
                    # The gradient reaching h: through the norm (relative to its terms) plus dh.
                    h_tol = TOLERANCES[h_dtype][1] if h_dtype in TOLERANCES else bwd_tol
                    tol = Tol(max(bwd_tol.atol, h_tol.atol), max(bwd_tol.rtol, h_tol.rtol))
                    dx_scale = float(want_g[0].abs().max()) + 1
                    _check_grad(g[id(x)], want_g[0], s.x, tol, dx_scale, "dx")
                    _check_grad(g[id(r)], want_g[1], residual, tol, dx_scale, "dresidual")
                    sqrt_m = math.sqrt(M)
                    if w is not None:
                        _check_grad(g[id(w)], want_g[2], s.weight, bwd_tol, sqrt_m * (float(want_g[2].abs().max()) + 1), "dweight")
                    if b is not None:
                        _check_grad(g[id(b)], want_g[3], s.bias, bwd_tol, sqrt_m * (float(want_g[3].abs().max()) + 1), "dbias")
                except Exception as e:
                    failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
def test_add_norm_equals_add_then_norm(device):
    """float32: the fused op gives add-then-norm's values (torch's ops, same dtype)."""
    x = torch.randn(37, 1025, device=device)
    r = torch.randn(37, 1025, device=device)
    w, b = torch.randn(1025, device=device), torch.randn(1025, device=device)
    y, h = ln_ext.add_layer_norm(x, r, 1025, w, b)
    torch.testing.assert_close(h, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, F.layer_norm(x + r, (1025,), w, b), atol=2e-5, rtol=2e-5)
    y, h = ln_ext.add_rms_norm(x, r, 1025, w)
    torch.testing.assert_close(y, F.rms_norm(x + r, (1025,), w), atol=2e-5, rtol=2e-5)


def test_rms_norm_never_less_accurate_than_torch():
    """RMSNorm's error next to F.rms_norm's in the same dtype, on tiny, unit and huge
    scales and N = 1 .. 4097 (as tests/test_accuracy.py does for LayerNorm)."""
    from test_accuracy import _l2_error

    import numpy as np

    ld = np.longdouble
    failures = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for scale in (1e-3, 1.0, 1e3):
            for n in (1, 2, 3, 7, 127, 1000, 4097):
                x = (torch.randn(4, n, dtype=torch.float64) * scale).to(dtype)
                w = (torch.randn(n) * 0.5 + 1).to(dtype)
                xe = x.double().numpy().astype(ld)
                ref = xe / np.sqrt((xe * xe).mean(-1, keepdims=True) + ld(1e-6)) * w.double().numpy().astype(ld)
                ours = _l2_error(ln_ext.rms_norm(x, n, w, 1e-6), ref)
                theirs = _l2_error(F.rms_norm(x, [n], w, 1e-6), ref)
                floor = 4 * torch.finfo(dtype).eps * float(np.sqrt((ref.astype(np.float64) ** 2).sum()))
                if not ours <= 2 * theirs + floor:
                    failures.append(f"{dtype} scale={scale} N={n}: {ours:.3g} vs torch {theirs:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_non_contiguous(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    assert ln_ext.rms_norm(x, 5).shape == (0, 5)
    y, h = ln_ext.add_layer_norm(x, torch.randn(0, 5, device=device), 5)
    assert y.shape == h.shape == (0, 5)
    base = torch.randn(7, 40, device=device)
    xs, rs = base[:, ::2], base[:, 1::2]  # strided views
    y, h = ln_ext.add_rms_norm(xs, rs, 20)
    torch.testing.assert_close(h, xs + rs, atol=0, rtol=0)
    torch.testing.assert_close(y, F.rms_norm(xs + rs, (20,)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_bitwise_reproducible(device, num_threads):
    """dweight/dbias (and dx) of the add + norm ops are the same bits run to run and on 1 or
    2 CPU threads."""
    x = torch.randn(300, 513, device=device)
    r = torch.randn(300, 513, device=device)
    w, b = torch.randn(513, device=device), torch.randn(513, device=device)
    dy = torch.randn_like(x)
    results = []
    for threads in (1, 2, 2):
        num_threads(threads)
        leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
        y, h = ln_ext.add_layer_norm(*leaves[:2], 513, *leaves[2:])
        grads = torch.autograd.grad([y, h], leaves, [dy, dy])
        leaves2 = [t.clone().requires_grad_(True) for t in (x, w)]
        grads += torch.autograd.grad(ln_ext.rms_norm(leaves2[0], 513, leaves2[1]), leaves2, dy)
        results.append(grads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_double_backward(device):
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True) + 0.5
    r = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    fns = [
        (lambda x, w: ln_ext.rms_norm(x, 7, w), (x, w)),
        (lambda x, r, w, b: ln_ext.add_layer_norm(x, r, 7, w, b), (x, r, w, b)),
        (lambda x, r, w: ln_ext.add_rms_norm(x, r, 7, w), (x, r, w)),
    ]
    for fn, args in fns:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schemas, fake kernels, autograd registration and AOT dispatch of the new ops."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 9, device=device).to(dtype)
        r = torch.randn(5, 9, device=device)  # float32 stream beside bf16 x
        w = torch.randn(9, device=device).to(dtype)
        b = torch.randn(9, device=device).to(dtype)
        grad = dtype == torch.float32
        xg, rg, wg, bg = (t.clone().requires_grad_(grad) for t in (x, r, w, b))
        torch.library.opcheck(OPS.rms_norm_fwd.default, (xg, [9], wg, 1e-5))
        torch.library.opcheck(OPS.add_layer_norm_fwd.default, (xg, rg.to(dtype) if grad else r, [9], wg, bg, 1e-5))
        torch.library.opcheck(OPS.add_rms_norm_fwd.default, (xg, rg, [9], wg, 1e-5))
        _, rstd = OPS.rms_norm_fwd(x, [9], w, 1e-5)
        dy = torch.randn_like(x)
        torch.library.opcheck(OPS.rms_norm_bwd.default, (dy, x, rstd, w, [True, True], torch.randn_like(x)))
        # One normalized element: dx from eps (the exact form).
        x1, w1 = x[:, :1].contiguous(), w[:1].contiguous()
        _, rstd1 = OPS.rms_norm_fwd(x1, [1], w1, 1e-5)
        torch.library.opcheck(OPS.rms_norm_bwd.default, (torch.randn_like(x1), x1, rstd1, w1, [True, True],
                                                         torch.randn_like(x1), 0.0, 1e-5))
        _, mean, rstd = OPS.layer_norm_fwd(x, [9], w, b, 1e-5)
        torch.library.opcheck(OPS.layer_norm_bwd.default, (dy, x, mean, rstd, w, b, [True, True, True], torch.randn_like(x)))


def test_bad_arguments_are_named():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"ln_ext.add_layer_norm: residual must have the input's shape \[4, 6\], got \[4, 5\]"):
        ln_ext.add_layer_norm(x, torch.randn(4, 5), 6)
    with pytest.raises(RuntimeError, match=r"ln_ext.add_rms_norm: residual must be float32, float64, float16 or bfloat16"):
        ln_ext.add_rms_norm(x, torch.ones(4, 6, dtype=torch.int64), 6)
    with pytest.raises(RuntimeError, match=r"the residual stream .* must be the input's dtype \(BFloat16\) or float32, got Half"):
        ln_ext.add_layer_norm(x.bfloat16(), torch.randn(4, 6).half(), 6)
    with pytest.raises(RuntimeError, match=r"must be the input's dtype \(Float\), got Double"):
        ln_ext.add_rms_norm(x, torch.randn(4, 6), 6, residual_dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"ln_ext.rms_norm: input must be float32, float64, float16 or bfloat16"):
        ln_ext.rms_norm(torch.ones(4, 6, dtype=torch.int32), 6)
    with pytest.raises(RuntimeError, match=r"ln_ext.rms_norm: weight must have shape normalized_shape=\[6\]"):
        ln_ext.rms_norm(x, 6, torch.ones(5))
    with pytest.raises(RuntimeError, match=r"ln_ext.rms_norm: normalized_shape=\[5\] must equal the trailing dims"):
        ln_ext.rms_norm(x, 5)


def test_modules_are_drop_ins():
    """ln_ext.RMSNorm is an nn.RMSNorm (constructor, state_dict, repr); the converter swaps
    nn.RMSNorm too (unless rms_norm=False), keeping the Parameter objects; residual= gives
    the fused add + norm of a pre-norm block."""
    ref = nn.RMSNorm(16, eps=1e-6)
    ours = ln_ext.RMSNorm(16, eps=1e-6)
    assert isinstance(ours, nn.RMSNorm) and repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), ref(x))
    assert ln_ext.RMSNorm(16).eps is None  # finfo(dtype).eps at call time, as nn.RMSNorm

    model = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16), nn.LayerNorm(16))
    params = [id(p) for p in model.parameters()]
    converted = ln_ext.convert_layer_norm(model)
    assert type(converted[1]) is ln_ext.RMSNorm and type(converted[2]) is ln_ext.LayerNorm
    assert [id(p) for p in converted.parameters()] == params
    kept = ln_ext.convert_layer_norm(nn.Sequential(nn.RMSNorm(16)), rms_norm=False)
    assert type(kept[0]) is nn.RMSNorm

    r = torch.randn(3, 16)
    for mod, fn in ((ln_ext.LayerNorm(16), lambda h, m: F.layer_norm(h, (16,), m.weight, m.bias)),
                    (ln_ext.RMSNorm(16), lambda h, m: F.rms_norm(h, (16,), m.weight))):
        y, h = mod(x, residual=r)
        torch.testing.assert_close(h, x + r, atol=0, rtol=0)
        torch.testing.assert_close(y, fn(x + r, mod), atol=2e-5, rtol=2e-5)


class _PreNormBlock(nn.Module):
    """h = x + mlp(norm(x)) the way a pre-norm Transformer block writes its residual stream."""

    def __init__(self, d, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(d), norm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x, residual):
        y, h = self.norm1(x, residual=residual)
        y2, h2 = self.norm2(self.fc(y), residual=h)
        return y2, h2


def test_compile_fullgraph_and_export():
    """torch.compile(fullgraph=True) traces the fused ops (no graph break, eager's values),
    and torch.export keeps each as one node."""
    for norm in (ln_ext.LayerNorm, ln_ext.RMSNorm):
        torch.manual_seed(0)
        block = _PreNormBlock(32, norm)
        x, r = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
        want = block(x, r)
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True)(x, r)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        ep = torch.export.export(block, (x, r))
        op = "add_layer_norm_fwd" if norm is ln_ext.LayerNorm else "add_rms_norm_fwd"
        nodes = [n for n in ep.graph.nodes if n.op == "call_function" and op in str(n.target)]
        assert len(nodes) == 2, [str(n.target) for n in ep.graph.nodes]
        for g, w in zip(ep.module()(x, r), want):
            torch.testing.assert_close(g, w)


@pytest.mark.cuda
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and ln_ext.has_cuda_kernels()), reason="needs a GPU"))])
def test_cuda_autocast_like_torch(device):
    """Under CUDA autocast rms_norm returns float32 as torch's does (its float32 list), from
    the 16-bit input read as it is; add + norm likewise for y, h in the stream's dtype."""
    x = torch.randn(8, 1000, device=device, dtype=torch.bfloat16)
    w = torch.randn(1000, device=device, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.rms_norm(x, (1000,), w)
        got = ln_ext.rms_norm(x, 1000, w)
        y, h = ln_ext.add_rms_norm(x, x, 1000, w)
    assert got.dtype == want.dtype == torch.float32 and y.dtype == torch.float32 and h.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_capped_cpu_build_matches_reference(isa):
    """The family's reference comparisons again with the CPU row kernels capped at `isa`
    (the generic build; the AVX2 one, which an AVX-512 CPU would not pick)."""
    run_with_cpu_isa_cap(["test_norm_family.py::test_rms_norm_matches_float64_reference",
                          "test_norm_family.py::test_add_norm_matches_float64_reference"], isa=isa)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_16bit_input_and_residual_summed_in_float32_convert_their_gradient_once(op):
    """bf16 x and residual with residual_dtype=float32 (h in float32): the one gradient
    of h reaches both as bf16 through a single conversion, as it reaches them with no
    conversion at all when the dtypes match (one tensor for both, not two copies)."""
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    y, h = getattr(ln_ext, op)(x, r, (16,), residual_dtype=torch.float32)
    assert h.dtype == torch.float32
    c = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    gx, gr = torch.autograd.grad((y.float() * c).sum() + h.sum(), [x, r])
    assert gx.dtype == gr.dtype == torch.bfloat16
    assert gx.data_ptr() == gr.data_ptr()
    want = torch.autograd.grad((getattr(ln_ext, op)(x.float(), r.float(), (16,))[0] * c).sum()
                               + (x.float() + r.float()).sum(), x)[0]
    torch.testing.assert_close(gx.float(), want.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
