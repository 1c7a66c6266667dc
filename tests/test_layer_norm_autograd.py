"""Autograd, op registration, torch.compile, autocast and reproducibility of the LayerNorm ops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ln_ext
from samples import CUDA_ONLY, DEVICES, TOLERANCES, Tol, assert_close_scaled, make_sample, sample_inputs


def _grad_inputs(s):
    """ln_ext.layer_norm as a function of the tensors of s that require grad."""
    leaves = [t for t in (s.x, s.weight, s.bias) if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        x = next(it)
        w = next(it) if s.weight is not None else None
        b = next(it) if s.bias is not None else None
        return ln_ext.layer_norm(x, s.normalized_shape, w, b, s.eps)

    return fn, leaves


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for s in sample_inputs(device, dtypes=[torch.float64], small=True):
        fn, leaves = _grad_inputs(s.with_grad())
        assert torch.autograd.gradcheck(fn, leaves), s.name


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device):
    """Second derivatives go through the differentiable composite path in ops.py."""
    for s in sample_inputs(device, dtypes=[torch.float64], small=True):
        fn, leaves = _grad_inputs(s.with_grad())
        assert torch.autograd.gradgradcheck(fn, leaves), s.name


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_nn_layer_norm(device):
    """A gradient penalty (grad of a grad) equals nn.LayerNorm's, in float32."""
    s = make_sample("dd", (5, 33), device=device).with_grad()
    results = []
    for fn in (ln_ext.layer_norm, F.layer_norm):
        y = fn(*s.args())
        (dx,) = torch.autograd.grad(y, s.x, s.dy, create_graph=True)
        # dx does not depend on bias.
        results.append(torch.autograd.grad(dx.square().sum(), (s.x, s.weight)))
    for got, want, name in zip(*results, ("x", "weight")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd(device):
    """Schema, fake kernel, autograd registration and AOT dispatch of layer_norm_fwd."""
    for s in sample_inputs(device, small=True):
        s = s.with_grad() if s.x.dtype in (torch.float32, torch.float64) else s
        torch.library.opcheck(torch.ops.ln_ext.layer_norm_fwd.default, s.op_args())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bwd(device):
    """layer_norm_bwd has no autograd formula of its own (its double backward is the
    composite in ops.py), so it is checked on inputs that do not require grad."""
    masks = ([True, True, True], [True, False, False], [False, True, True], [True, True, True])
    for i, s in enumerate(sample_inputs(device, small=True)):
        _, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(*s.op_args())
        torch.library.opcheck(torch.ops.ln_ext.layer_norm_bwd.default,
                              (s.dy, s.x, mean, rstd, s.weight, s.bias, masks[i % len(masks)]))


class _Block(nn.Module):
    """A small pre-norm MLP block: the kind of model LayerNorm is used in."""

    def __init__(self, d, norm):
        super().__init__()
        self.norm1 = norm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.norm2 = norm((2 * d,), elementwise_affine=False)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(self.norm2(torch.relu(self.fc(self.norm1(x)))))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces through ln_ext.LayerNorm (no graph break,
    which fullgraph turns into an error) and gives eager's outputs and gradients."""
    torch._dynamo.reset()
    model = _Block(48, ln_ext.LayerNorm).to(device)
    x = torch.randn(6, 48, device=device) * 2 + 0.5
    compiled = torch.compile(model, fullgraph=True)
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # Same numbers as the uncompiled nn.LayerNorm model.
    ref = _Block(48, nn.LayerNorm).to(device)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_functional_dynamic_shapes(device):
    """ln_ext.layer_norm with every sample's layout under torch.compile(dynamic=True)."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def f(x, w, b):
        return ln_ext.layer_norm(x * 1.5, (x.shape[-1],), w, b) + 1

    for M, N in ((3, 5), (7, 33), (2, 100)):
        s = make_sample("c", (M, N), device=device)
        torch.testing.assert_close(f(s.x, s.weight, s.bias), F.layer_norm(s.x * 1.5, (N,), s.weight, s.bias) + 1)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu(x_dtype, param_dtype):
    """Under CPU autocast ln_ext gives nn.LayerNorm's dtype and values."""
    ours = ln_ext.LayerNorm(40, dtype=param_dtype)
    ref = nn.LayerNorm(40, dtype=param_dtype)
    with torch.no_grad():
        ours.weight.normal_(1, 0.5)
        ours.bias.normal_(0, 0.5)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(5, 40) * 2 + 1).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if x_dtype != param_dtype and param_dtype != torch.float32:
            # nn.LayerNorm rejects a bf16 weight with a float32 input; so do we.
            with pytest.raises(RuntimeError):
                ref(x)
            with pytest.raises(RuntimeError, match="weight"):
                ours(x)
            return
        want = ref(x)
        got = ours(x)
    assert got.dtype == want.dtype
    fwd_tol, _ = TOLERANCES[want.dtype]
    torch.testing.assert_close(got, want, atol=4 * fwd_tol.atol, rtol=4 * fwd_tol.rtol)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autocast_cuda(device, amp_dtype, x_dtype):
    """CUDA autocast runs layer_norm in float32: the output is float32 like nn.LayerNorm's,
    with its values, and the backward gives gradients of the leaves' dtypes."""
    ours = ln_ext.LayerNorm(96, device=device)
    ref = nn.LayerNorm(96, device=device)
    with torch.no_grad():
        ours.weight.normal_(1, 0.5)
        ours.bias.normal_(0, 0.5)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(7, 96, device=device) * 2 + 1).to(x_dtype).requires_grad_(True)
    with torch.autocast("cuda", dtype=amp_dtype):
        got = ours(x)
        want = ref(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, ours.weight, ours.bias), dy)
    want_grads = torch.autograd.grad(want, (x, ref.weight, ref.bias), dy)
    for g, w, name in zip(got_grads, want_grads, ("dx", "dweight", "dbias")):
        assert g.dtype == w.dtype, name
        # Two kernels' roundings apart: 4x the reference tolerance.
        bwd = TOLERANCES[g.dtype][1]
        assert_close_scaled(g, w.double(), Tol(4 * bwd.atol, 4 * bwd.rtol), what=name)


def _grads_of(s):
    s = s.with_grad()
    y = ln_ext.layer_norm(*s.args())
    return torch.autograd.grad(y, (s.x, s.weight, s.bias), s.dy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4099, 67), (333, 1025), (3, 70000)])
def test_gradients_bitwise_reproducible(device, dtype, shape):
    """Two backward runs give bitwise equal dx, dweight, dbias (no float atomics, fixed
    reduction order); forward too."""
    s = make_sample("repro", shape, dtype=dtype, device=device)
    first = _grads_of(s)
    second = _grads_of(s)
    for a, b, name in zip(first, second, ("dx", "dweight", "dbias")):
        assert torch.equal(a, b), name
    assert torch.equal(ln_ext.layer_norm(*s.args()), ln_ext.layer_norm(*s.args()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4099, 67), (333, 1025), (333, 4099)])  # last: rows in pairs
def test_gradients_independent_of_thread_count(num_threads, dtype, shape):
    """The CPU kernels give the same bits on 1 and 2 threads: rows are cut into a fixed
    number of blocks whatever the thread count."""
    s = make_sample("threads", shape, dtype=dtype)
    results = []
    for n in (1, 2):
        num_threads(n)
        results.append((ln_ext.layer_norm(*s.args()),) + _grads_of(s))
    for a, b, name in zip(*results, ("y", "dx", "dweight", "dbias")):
        assert torch.equal(a, b), name
