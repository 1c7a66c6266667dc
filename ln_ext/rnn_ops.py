"""Fake kernels and autograd of the fused LN-RNN cell ops (torch.ops.ln_ext.*_cell_*).

The ops (schemas in csrc/registration.cpp, equations and shapes in csrc/rnn.h) do
one time step's element-wise work; the modules in rnn.py call them once per step.
Each forward op is differentiable through `register_autograd`: its backward calls
the matching fused backward op, whose per-row parameter contributions are summed
here over the batch (a fixed-order reduction, so gradients are reproducible).
A backward that must itself be differentiable (create_graph=True) is computed
from the op-level composites below instead.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.ln_ext.*)
from . import reference
from .ops import check_same_device

_ops = torch.ops.ln_ext


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A new [B, n] tensor like t (batch from t's first dim)."""
    return t.new_empty((t.shape[0], n))


def _acc_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.new_empty((t.shape[0], n), dtype=_acc_dtype(t))


def _check_hproj(hproj: torch.Tensor, n_gates: int, op: str, **operands) -> int:
    """H of hproj: [B, n_gates * H]; every other operand on hproj's device (as csrc/rnn.cpp checks)."""
    check_same_device(op, "hproj", hproj, **operands)
    torch._check(hproj.dim() == 2, lambda: f"ln_ext.{op}: hproj must be 2-D, got {list(hproj.shape)}")
    torch._check(hproj.shape[1] % n_gates == 0, lambda: f"ln_ext.{op}: hproj must be [batch, {n_gates} * hidden]")
    return hproj.shape[1] // n_gates


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("ln_ext::rnn_cell_fwd")
def _rnn_cell_fwd_fake(xproj, hproj, gamma, beta, eps):
    H = _check_hproj(hproj, 1, "rnn_cell_fwd", xproj=xproj, gamma=gamma, beta=beta)
    torch._check(xproj.shape == hproj.shape, lambda: "ln_ext.rnn_cell_fwd: xproj must have hproj's shape")
    return _rows(hproj, H), _acc_rows(hproj, 2)


@torch.library.register_fake("ln_ext::rnn_cell_bwd")
def _rnn_cell_bwd_fake(dh, xproj, hproj, stats, gamma, beta):
    H = _check_hproj(hproj, 1, "rnn_cell_bwd", dh=dh, xproj=xproj, stats=stats, gamma=gamma, beta=beta)
    return _rows(hproj, H), _acc_rows(hproj, H), _acc_rows(hproj, H)


@torch.library.register_fake("ln_ext::lstm_cell_fwd")
def _lstm_cell_fwd_fake(xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, eps):
    H = _check_hproj(hproj, 4, "lstm_cell_fwd", xgates=xgates, c_prev=c_prev, gamma_h=gamma_h, bias=bias,
                     gamma_c=gamma_c, beta_c=beta_c)
    torch._check(xgates.shape == hproj.shape, lambda: "ln_ext.lstm_cell_fwd: xgates must have hproj's shape")
    return _rows(hproj, H), _rows(hproj, H), _acc_rows(hproj, 4 * H), _acc_rows(hproj, 4)


@torch.library.register_fake("ln_ext::lstm_cell_bwd")
def _lstm_cell_bwd_fake(dh, dc, hproj, c_prev, c, gates, stats, gamma_h, gamma_c, beta_c):
    H = _check_hproj(hproj, 4, "lstm_cell_bwd", dh=dh, dc=dc, c_prev=c_prev, c=c, gates=gates, stats=stats,
                     gamma_h=gamma_h, gamma_c=gamma_c, beta_c=beta_c)
    return (_rows(hproj, 4 * H), _rows(hproj, 4 * H), _rows(hproj, H),
            _acc_rows(hproj, 4 * H), _acc_rows(hproj, H), _acc_rows(hproj, H))


@torch.library.register_fake("ln_ext::gru_cell_fwd")
def _gru_cell_fwd_fake(xzr, xn, hproj, h_prev, gamma_h, beta_h, eps):
    H = _check_hproj(hproj, 3, "gru_cell_fwd", xzr=xzr, xn=xn, h_prev=h_prev, gamma_h=gamma_h, beta_h=beta_h)
    return _rows(hproj, H), _acc_rows(hproj, 4 * H), _acc_rows(hproj, 4)


@torch.library.register_fake("ln_ext::gru_cell_bwd")
def _gru_cell_bwd_fake(dh, hproj, h_prev, gates, stats, gamma_h):
    H = _check_hproj(hproj, 3, "gru_cell_bwd", dh=dh, h_prev=h_prev, gates=gates, stats=stats, gamma_h=gamma_h)
    return (_rows(hproj, 2 * H), _rows(hproj, H), _rows(hproj, 3 * H), _rows(hproj, H),
            _acc_rows(hproj, 3 * H), _acc_rows(hproj, 3 * H))


# ---------------------------------------------------------------- op-level composites
# The same math as the fused ops, written with differentiable torch ops; used only
# for gradients that must themselves be differentiable (double backward).

def _ln(x, gamma, beta, eps):
    return reference.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def _rnn_cell_composite(xproj, hproj, gamma, beta, eps):
    return (torch.tanh(_ln(xproj + hproj, gamma, beta, eps)),)


def _lstm_cell_composite(xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, eps):
    i, f, g, o = (xgates + _ln(hproj, gamma_h, None, eps) + bias).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(_ln(c, gamma_c, beta_c, eps)), c


def _gru_cell_composite(xzr, xn, hproj, h_prev, gamma_h, beta_h, eps):
    H = h_prev.shape[-1]
    hzr = _ln(hproj[:, : 2 * H], gamma_h[: 2 * H], beta_h[: 2 * H], eps)
    hn = _ln(hproj[:, 2 * H:], gamma_h[2 * H:], beta_h[2 * H:], eps)
    z, r = torch.sigmoid(xzr + hzr).chunk(2, dim=-1)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * h_prev + z * n,)


def _composite_grads(ctx, composite, grads):
    """Gradients of `composite` at the saved inputs, with a graph (create_graph)."""
    inputs = ctx.composite_inputs
    diff = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        outs = composite(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in diff],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(diff, got):
        result[i] = g
    return tuple(result)


def _colsum(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Parameter gradient from per-row contributions: a sum over the batch."""
    return rows.sum(0, dtype=_acc_dtype(rows)).to(like.dtype)


def _keep(needs, *grads):
    return tuple(g if n else None for n, g in zip(needs, grads))


# ---------------------------------------------------------------- autograd: LN-RNN

def _rnn_setup(ctx, inputs, output):
    xproj, hproj, gamma, beta, eps = inputs
    _, stats = output
    ctx.save_for_backward(xproj, hproj, stats, gamma, beta)
    ctx.eps = eps
    ctx.mark_non_differentiable(stats)


def _rnn_backward(ctx, dh, _dstats):
    xproj, hproj, stats, gamma, beta = ctx.saved_tensors
    if torch.is_grad_enabled():
        ctx.composite_inputs = (xproj, hproj, gamma, beta, ctx.eps)
        return _composite_grads(ctx, _rnn_cell_composite, (dh,))
    da, dgamma_rows, dbeta_rows = _ops.rnn_cell_bwd(dh, xproj, hproj, stats, gamma, beta)
    return _keep(ctx.needs_input_grad, da, da, _colsum(dgamma_rows, gamma),
                 _colsum(dbeta_rows, beta), None)


torch.library.register_autograd("ln_ext::rnn_cell_fwd", _rnn_backward, setup_context=_rnn_setup)


# ---------------------------------------------------------------- autograd: LN-LSTM

def _lstm_setup(ctx, inputs, output):
    xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, eps = inputs
    _, c, gates, stats = output
    ctx.save_for_backward(xgates, hproj, c_prev, c, gates, stats, gamma_h, bias, gamma_c, beta_c)
    ctx.eps = eps
    ctx.mark_non_differentiable(gates, stats)


def _lstm_backward(ctx, dh, dc, _dgates, _dstats):
    xgates, hproj, c_prev, c, gates, stats, gamma_h, bias, gamma_c, beta_c = ctx.saved_tensors
    dh = torch.zeros_like(c) if dh is None else dh
    dc = torch.zeros_like(c) if dc is None else dc
    if torch.is_grad_enabled():
        ctx.composite_inputs = (xgates, hproj, c_prev, gamma_h, bias, gamma_c, beta_c, ctx.eps)
        return _composite_grads(ctx, _lstm_cell_composite, (dh, dc))
    dgates, dhproj, dc_prev, dgamma_h_rows, dgamma_c_rows, dbeta_c_rows = _ops.lstm_cell_bwd(
        dh, dc, hproj, c_prev, c, gates, stats, gamma_h, gamma_c, beta_c)
    return _keep(ctx.needs_input_grad, dgates, dhproj, dc_prev, _colsum(dgamma_h_rows, gamma_h),
                 _colsum(dgates, bias), _colsum(dgamma_c_rows, gamma_c),
                 _colsum(dbeta_c_rows, beta_c), None)


torch.library.register_autograd("ln_ext::lstm_cell_fwd", _lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------- autograd: LN-GRU

def _gru_setup(ctx, inputs, output):
    xzr, xn, hproj, h_prev, gamma_h, beta_h, eps = inputs
    _, gates, stats = output
    ctx.save_for_backward(xzr, xn, hproj, h_prev, gates, stats, gamma_h, beta_h)
    ctx.eps = eps
    ctx.mark_non_differentiable(gates, stats)


def _gru_backward(ctx, dh, _dgates, _dstats):
    xzr, xn, hproj, h_prev, gates, stats, gamma_h, beta_h = ctx.saved_tensors
    if torch.is_grad_enabled():
        ctx.composite_inputs = (xzr, xn, hproj, h_prev, gamma_h, beta_h, ctx.eps)
        return _composite_grads(ctx, _gru_cell_composite, (dh,))
    dxzr, dxn, dhproj, dh_prev, dgamma_h_rows, dbeta_h_rows = _ops.gru_cell_bwd(
        dh, hproj, h_prev, gates, stats, gamma_h)
    return _keep(ctx.needs_input_grad, dxzr, dxn, dhproj, dh_prev,
                 _colsum(dgamma_h_rows, gamma_h), _colsum(dbeta_h_rows, beta_h), None)


torch.library.register_autograd("ln_ext::gru_cell_fwd", _gru_backward, setup_context=_gru_setup)
