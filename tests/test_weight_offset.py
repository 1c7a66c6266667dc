"""weight_offset: the gain is weight_offset + weight (Gemma's zero-centered 1 + w), in every op
of the norm family, forward and backward, read by the kernels as a scalar."""
import math

import pytest
import torch
import torch.nn.functional as F

import ln_ext
from samples import DEVICES, TOLERANCES, assert_close_scaled, sample_inputs
from test_norm_family import _check_grad, _leaf, reference

OFFSETS = [1.0, -0.5]
# (function, centered, with a residual)
OPS = [
    (lambda x, r, s, w, b, eps, o: ln_ext.layer_norm(x, s, w, b, eps, weight_offset=o), True, False),
    (lambda x, r, s, w, b, eps, o: ln_ext.rms_norm(x, s, w, eps, weight_offset=o), False, False),
    (lambda x, r, s, w, b, eps, o: ln_ext.add_layer_norm(x, r, s, w, b, eps, weight_offset=o), True, True),
    (lambda x, r, s, w, b, eps, o: ln_ext.add_rms_norm(x, r, s, w, eps, weight_offset=o), False, True),
]
OP_IDS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,centered,add", OPS, ids=OP_IDS)
def test_matches_float64_reference_of_the_offset_gain(device, op, centered, add):
    """y (and h) and the gradients of x, residual, weight and bias against float64 autograd of
    the norm with gain weight_offset + weight: dweight is the gradient of that gain."""
    failures, count = [], 0
    for s in sample_inputs(device, small=True):
        if s.weight is None or s.x.numel() == 0:
            continue
        for offset in OFFSETS:
            count += 1
            fwd_tol, bwd_tol = TOLERANCES[s.x.dtype]
            try:
                residual = torch.randn_like(s.x) if add else None
                bias = s.bias if centered else None
                x, r, w, b = (_leaf(t) for t in (s.x, residual, s.weight, bias))
                out = op(x, r, s.normalized_shape, w, b, s.eps, offset)
                y = out[0] if add else out
                gain = s.weight.double() + offset
                want_y, _, (dx_ref, dr_ref, dw_ref, db_ref) = reference(
                    s.x, residual, s.normalized_shape, gain, bias, s.eps, centered, s.dy)
                assert_close_scaled(y, want_y, fwd_tol, scale=1 + abs(offset), what="y")
                leaves = [t for t in (x, r, w, b) if t is not None]
                grads = iter(torch.autograd.grad(y, leaves, s.dy))
                g_scale = float(s.dy.double().abs().max()) * (float(gain.abs().max()) + 1)
                for got_like, want, what in ((s.x, dx_ref, "dx"), (residual, dr_ref, "dresidual"),
                                             (s.weight, dw_ref, "dweight"), (bias, db_ref, "dbias")):
                    if got_like is None:
                        continue
                    scale = g_scale * 100 if what in ("dx", "dresidual") else g_scale * math.sqrt(max(s.rows, 1)) * 10
                    _check_grad(next(grads), want, got_like, bwd_tol, scale, what)
            except Exception as e:  # collect them all
                failures.append(f"{s.name} offset={offset}: {type(e).__name__}: {e}")
    assert count > 20
    assert not failures, f"{len(failures)} of {count} failed:\n" + "\n\n".join(failures[:10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_less_accurate_than_torch_with_a_one_plus_w_tensor(dtype):
    """Same-dtype torch with the gain made as a tensor (F.layer_norm(x, s, 1 + w, b)) vs ours
    with weight_offset=1, both against float64: ours at most 2x torch's error plus a floor."""
    g = torch.Generator().manual_seed(0)
    for rows, n in [(4, 1), (4, 2), (16, 7), (8, 1000), (3, 4097)]:
        x = (torch.randn(rows, n, generator=g) * 3 + 5).to(dtype)
        w = (torch.randn(n, generator=g) * 0.3).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        exact = F.layer_norm(x.double(), (n,), w.double() + 1, b.double(), 1e-5)
        theirs = F.layer_norm(x, (n,), 1 + w, b, 1e-5)
        ours = ln_ext.layer_norm(x, (n,), w, b, 1e-5, weight_offset=1.0)
        err = lambda t: float((t.double() - exact).norm() / exact.norm())  # noqa: E731
        assert err(ours) <= 2 * err(theirs) + 4 * torch.finfo(dtype).eps, (rows, n)
        exact_rms = F.rms_norm(x.double(), (n,), w.double() + 1, 1e-6)
        assert (float((ln_ext.rms_norm(x, (n,), w, 1e-6, weight_offset=1.0).double() - exact_rms).norm()
                      / exact_rms.norm())
                <= 2 * float((F.rms_norm(x, (n,), 1 + w, 1e-6).double() - exact_rms).norm() / exact_rms.norm())
                + 4 * torch.finfo(dtype).eps), (rows, n)


def test_no_gain_tensor_is_made_per_call():
    """The offset reaches the kernels as a number: no aten op runs beside ours."""
    x, w = torch.randn(8, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    with torch.profiler.profile() as prof:
        y = ln_ext.rms_norm(x, (64,), w, 1e-6, weight_offset=1.0)
        y.backward(torch.ones_like(y))
    names = {e.name for e in prof.events()}
    assert "ln_ext::rms_norm_fwd" in names and "ln_ext::rms_norm_bwd" in names
    assert not {"aten::add", "aten::add_"} & names


def test_offset_without_a_weight_is_refused_by_name():
    x = torch.randn(3, 8)
    for call in (lambda: ln_ext.layer_norm(x, (8,), None, None, weight_offset=1.0),
                 lambda: ln_ext.rms_norm(x, (8,), None, weight_offset=1.0),
                 lambda: torch.compile(lambda t: ln_ext.rms_norm(t, (8,), None, weight_offset=1.0), fullgraph=True)(x)):
        with pytest.raises(Exception, match="weight_offset=1.*needs a weight"):
            call()


def test_modules_take_weight_offset():
    """LayerNorm/RMSNorm(weight_offset=1): the weight starts at 0 (a gain of 1), the state_dict
    is nn.LayerNorm's / nn.RMSNorm's, and the forward uses 1 + weight."""
    for cls, ref_cls in ((ln_ext.LayerNorm, torch.nn.LayerNorm), (ln_ext.RMSNorm, torch.nn.RMSNorm)):
        m = cls(16, weight_offset=1.0)
        assert torch.equal(m.weight, torch.zeros(16)) and "weight_offset=1.0" in repr(m)
        assert m.state_dict().keys() == ref_cls(16).state_dict().keys()
        with torch.no_grad():
            m.weight.normal_()
        x = torch.randn(4, 16)
        gain = m.weight.double() + 1
        want = (F.layer_norm(x.double(), (16,), gain, m.bias.double(), m.eps) if cls is ln_ext.LayerNorm
                else F.rms_norm(x.double(), (16,), gain, m.eps))
        torch.testing.assert_close(m(x).double(), want, atol=1e-5, rtol=1e-5)


def test_opcheck_with_offset():
    x, w, b = torch.randn(5, 12, dtype=torch.float64), torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ln_ext.layer_norm_fwd.default, (x, [12], w, b, 1e-5, None, 1.0))
    torch.library.opcheck(torch.ops.ln_ext.rms_norm_fwd.default, (x.requires_grad_(), [12], w.requires_grad_(), 1e-5,
                                                                  None, 1.0))
    assert torch.autograd.gradcheck(lambda x, w, b: ln_ext.layer_norm(x, (12,), w, b, 1e-5, weight_offset=1.0),
                                    (x.detach().requires_grad_(), w.detach().requires_grad_(), b.requires_grad_()))
