"""Never less accurate than the op we replace: ln_ext's error against a high-precision
reference, next to torch's own error in the same dtype on the same input.

The rows are the ill-conditioned ones where a LayerNorm loses digits: means far above
the spread (|offset| / scale up to 1e8), tiny and huge scales, and N = 1 and 2. Errors
are L2 norms of the difference from the reference over a whole output; ours may be at
most twice torch's plus a floor of a few units in the last place of the terms the output
is computed from (so that a case where torch happens to round perfectly does not demand
the impossible). Exact zeros where the math gives them (N = 1) are tested exactly.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ln_ext
from samples import DEVICES

# (offset, scale) of x = offset + scale * randn: the mean far above the spread, tiny and
# huge spreads, and a well-conditioned row. Means of 10, 30 and 300 spreads straddle the
# CPU backward's kNegligibleShift, below which a row's dweight terms keep the stored mean's
# rounding (row_kernels_impl.h).
FAMILIES = [(5.0, 1e-3), (-100.0, 1e-3), (1e4, 1.0), (1e3, 1e-2), (1e5, 1.0), (0.0, 1e-6), (0.0, 1e6), (0.5, 1.0),
            (10.0, 1.0), (-30.0, 1.0), (300.0, 1.0)]
ROW_LENGTHS = [1, 2, 3, 7, 127, 1000, 4097]
FLOOR_ULPS = 4

# float64 inputs need a reference with more bits than float64 itself: numpy's extended
# long double (64-bit mantissa on x86-64, 113 bits on aarch64 Linux).
_EXTENDED = np.finfo(np.longdouble).nmant >= 63


def extended_reference(x, w, b, dy, eps):
    """y, dx, dweight, dbias and the scale of the terms each is computed from, for
    x, dy: [M, N] and w, b: [N] (None for absent), in numpy long double."""
    ld = np.longdouble

    def arr(t):
        return None if t is None else t.detach().cpu().double().numpy().astype(ld)

    x, w, b, dy = arr(x), arr(w), arr(b), arr(dy)
    mean = x.mean(-1, keepdims=True)
    mean = mean + (x - mean).mean(-1, keepdims=True)
    centered = x - mean
    rstd = 1 / np.sqrt((centered * centered).mean(-1, keepdims=True) + ld(eps))
    xhat = centered * rstd
    wv = w if w is not None else ld(1)
    y = xhat * wv + (b if b is not None else ld(0))
    g = dy * wv
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    outputs = {"y": y, "dx": dx, "dweight": (dy * xhat).sum(0), "dbias": dy.sum(0)}

    def norm(a):
        return float(np.sqrt((a.astype(np.float64) ** 2).sum()))

    terms = {"y": norm(xhat * wv) + norm(np.broadcast_to(b if b is not None else ld(0), y.shape)),
             "dx": norm(rstd * g), "dweight": norm(dy * xhat), "dbias": norm(dy)}
    return outputs, terms


def _forward_backward(fn, x, w, b, dy, eps):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = fn(leaves[0], (x.shape[-1],), leaves[1], leaves[2], eps)
    dx, dw, db = torch.autograd.grad(y, leaves, dy)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def _l2_error(got, want):
    d = got.detach().cpu().double().numpy().astype(np.longdouble) - want
    return float(np.sqrt((d * d).sum()))


def _cases(dtype):
    for offset, scale in FAMILIES:
        if dtype == torch.float16 and max(abs(offset), scale) * 8 > torch.finfo(dtype).max:
            continue
        for n in ROW_LENGTHS:
            yield offset, scale, n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_never_less_accurate_than_torch(device, dtype):
    """y, dx, dweight and dbias on rows with |mean| >> spread, tiny and huge scales, N = 1..4097."""
    if dtype == torch.float64 and not _EXTENDED:
        pytest.skip("float64 needs an extended-precision reference; numpy's long double is float64 here")
    eps = 1e-5
    ulp = torch.finfo(dtype).eps
    failures, count = [], 0
    for offset, scale, n in _cases(dtype):
        rows = 5 if n < 128 else 3
        x = (torch.randn(rows, n, dtype=torch.float64) * scale + offset).to(dtype).to(device)
        w = (torch.randn(n) * 0.5 + 1).to(dtype).to(device)
        b = torch.randn(n).to(dtype).to(device)
        dy = torch.randn(rows, n).to(dtype).to(device)
        want, terms = extended_reference(x, w, b, dy, eps)
        ours = _forward_backward(ln_ext.layer_norm, x, w, b, dy, eps)
        theirs = _forward_backward(F.layer_norm, x, w, b, dy, eps)
        for name, ref in want.items():
            count += 1
            got = ours[name]
            if torch.isnan(got).any() and not np.isnan(ref.astype(np.float64)).any():
                failures.append(f"N={n} offset={offset} scale={scale} {name}: NaN")
                continue
            e_ours, e_torch = _l2_error(got, ref), _l2_error(theirs[name], ref)
            floor = FLOOR_ULPS * ulp * terms[name]
            if not e_ours <= 2 * e_torch + floor:
                failures.append(f"N={n} offset={offset} scale={scale} {name}: error {e_ours:.3g}, "
                                f"torch {e_torch:.3g}, floor {floor:.3g}")
    assert count > 100
    assert not failures, f"{len(failures)} of {count} outputs less accurate than torch:\n" + "\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_rows_keep_their_digits(device):
    """float32 rows whose mean is 1e4 to 1e5 times their spread: y and dweight stay within a
    few ulps of the terms (the mean's rounding, which a plain two-pass LayerNorm turns into
    a shift of every xhat, is corrected in the forward and again in the backward)."""
    cases = [(o, s, n) for o, s in [(1e4, 1.0), (5.0, 1e-3), (-100.0, 1e-3)] for n in (7, 1000, 4097)]
    for offset, scale, n in cases:
        x = (torch.randn(4, n, dtype=torch.float64) * scale + offset).float().to(device)
        w = (torch.randn(n) * 0.5 + 1).to(device)
        b = torch.randn(n).to(device)
        dy = torch.randn(4, n).to(device)
        want, terms = extended_reference(x, w, b, dy, 1e-5)
        ours = _forward_backward(ln_ext.layer_norm, x, w, b, dy, 1e-5)
        ulp = torch.finfo(torch.float32).eps
        for name in ("y", "dweight"):
            # sqrt(n) ulps: the rounding of n terms accumulated; without the corrections the
            # error is |offset| / scale ulps, 1e4 and more.
            bound = 8 * math.sqrt(n) * ulp * terms[name]
            err = _l2_error(ours[name], want[name])
            assert err <= bound, f"N={n} offset={offset} scale={scale} {name}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_single_element_rows_are_exact(device, dtype):
    """N = 1: every xhat is 0, so y = bias, dx = 0 and dweight = 0 exactly, whatever the
    scale of x and dy (rstd = 1 / sqrt(eps) magnifies any rounding left in dx)."""
    for scale in (1e-3, 1.0, 1000.0):
        x = (torch.randn(37, 1, dtype=torch.float64) * scale + scale).to(dtype).to(device)
        w = (torch.randn(1) + 2).to(dtype).to(device)
        b = torch.randn(1).to(dtype).to(device)
        dy = (torch.randn(37, 1) * scale).to(dtype).to(device)
        got = _forward_backward(ln_ext.layer_norm, x, w, b, dy, 1e-5)
        assert torch.equal(got["y"], b.expand_as(x)), f"scale {scale}: y != bias"
        assert torch.equal(got["dx"], torch.zeros_like(x)), f"scale {scale}: dx = {got['dx'].flatten()[:4]}"
        assert torch.equal(got["dweight"], torch.zeros_like(w)), f"scale {scale}: dweight {got['dweight']}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_single_column_cell_layer_norms_are_exact(device, dtype):
    """H = 1 in the LN-RNN cells: a layer norm over one value outputs its shift whatever
    its input, so the gradient through it is exactly 0: da of the LN-RNN cell; with no
    gradient of c from outside, the LN-LSTM's i, f, g gradients and dc_prev (LN(c)); the
    n part of the LN-GRU's recurrent projection."""
    ops = torch.ops.ln_ext

    def r(*shape, base=0.0, scale=1.0):
        return (base + scale * torch.randn(*shape, dtype=torch.float64)).to(dtype).to(device)

    B, eps = 37, 1e-5
    for scale in (1e-3, 1.0, 1e3):
        xproj, hproj = r(B, 1, scale=scale), r(B, 1, scale=scale)
        gamma, beta = r(1, base=1.0), r(1)
        _, stats = ops.rnn_cell_fwd(xproj, hproj, gamma, beta, eps)
        da, _, _ = ops.rnn_cell_bwd(r(B, 1), xproj, hproj, stats, gamma, beta)
        assert torch.equal(da, torch.zeros_like(da)), f"rnn scale {scale}: da {da.flatten()[:4]}"

        xgates, hproj4, c_prev = r(B, 4, scale=scale), r(B, 4, scale=scale), r(B, 1, scale=scale)
        gamma_h, bias, gamma_c, beta_c = r(4, base=1.0), r(4), r(1, base=1.0), r(1)
        _, c, gates, stats = ops.lstm_cell_fwd(xgates, hproj4, c_prev, gamma_h, bias, gamma_c, beta_c, eps)
        dgates, _, dc_prev, _, _, _ = ops.lstm_cell_bwd(r(B, 1), torch.zeros_like(c), hproj4, c_prev, c, gates, stats,
                                                       gamma_h, gamma_c, beta_c)
        assert torch.equal(dgates[:, :3], torch.zeros_like(dgates[:, :3])), f"lstm scale {scale}: {dgates[:2]}"
        assert torch.equal(dc_prev, torch.zeros_like(dc_prev)), f"lstm scale {scale}: dc_prev {dc_prev.flatten()[:4]}"

        xzr, xn, hproj3, h_prev = r(B, 2, scale=scale), r(B, 1, scale=scale), r(B, 3, scale=scale), r(B, 1)
        gamma3, beta3 = r(3, base=1.0), r(3)
        _, gates, stats = ops.gru_cell_fwd(xzr, xn, hproj3, h_prev, gamma3, beta3, eps)
        _, _, dhproj, _, _, _ = ops.gru_cell_bwd(r(B, 1), hproj3, h_prev, gates, stats, gamma3)
        assert torch.equal(dhproj[:, 2], torch.zeros_like(dhproj[:, 2])), f"gru scale {scale}: {dhproj[:2]}"


def _rms_single_element_dx(device, dtype, op, x, w, dy, eps):
    """dx of RMSNorm over one element through `op` ("rows", "add", "channels_first")."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    if op == "rows":
        y = ln_ext.rms_norm(leaves[0], (1,), leaves[1], eps)
    elif op == "add":  # the norm of h = x + 0: dx is the norm's (grad_h adds nothing here)
        y, _ = ln_ext.add_rms_norm(leaves[0], torch.zeros_like(x), (1,), leaves[1], eps)
    else:
        y = ln_ext.rms_norm_channels_first(leaves[0][..., None], leaves[1], eps)[..., 0]
    return torch.autograd.grad(y, leaves[0], dy)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["rows", "add", "channels_first"])
def test_single_element_rms_norm_dx_is_exact(device, dtype, op):
    """RMSNorm over N = 1: dx = rstd * g * (1 - xhat^2), and 1 - xhat^2 = eps * rstd^2 is tiny
    where |x| >> sqrt(eps). Formed by cancellation (as torch's composite rms_norm does) it
    loses every digit there; ours stays within a few ulps of the result itself (torch's does
    not, at |x| = 1e3)."""
    if dtype == torch.float64 and not _EXTENDED:
        pytest.skip("float64 needs an extended-precision reference; numpy's long double is float64 here")
    ld, ulp = np.longdouble, torch.finfo(dtype).eps
    failures = []
    for scale in (1e-4, 1e-2, 1.0, 1e3):
        for eps in (1e-5, 1e-6):
            x = (torch.randn(64, 1, dtype=torch.float64) * scale).to(dtype).to(device)
            w = (torch.randn(1) + 2).to(dtype).to(device)
            dy = torch.randn(64, 1).to(dtype).to(device)
            X, W, DY = (t.detach().cpu().double().numpy().astype(ld) for t in (x, w, dy))
            rstd = 1 / np.sqrt(X * X + ld(eps))
            want = DY * W * ld(eps) * rstd ** 3
            ours = _l2_error(_rms_single_element_dx(device, dtype, op, x, w, dy, eps), want)
            xs = x.detach().clone().requires_grad_(True)
            theirs = _l2_error(torch.autograd.grad(F.rms_norm(xs, (1,), w, eps), xs, dy)[0], want)  # for the message
            size = float(np.sqrt((want.astype(np.float64) ** 2).sum()))
            # A few ulps of dx itself, plus half the dtype's subnormal step per element (float16's
            # dx of x = 1e3 is below its smallest normal).
            bound = FLOOR_ULPS * ulp * size + 0.5 * torch.finfo(dtype).smallest_normal * ulp * math.sqrt(x.numel())
            if not ours <= bound:
                failures.append(f"scale={scale} eps={eps}: error {ours:.3g} of |dx| {size:.3g}, torch {theirs:.3g}")
    assert not failures, "\n".join(failures)
