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

import contextlib

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

@torch.library.register_fake("ln_ext::input_projection")
def _input_projection_fake(x, weight):
    check_same_device("input_projection", "input", x, weight=weight)
    torch._check(weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"ln_ext.input_projection: input's last dim must be weight's in_features, got input "
                         f"{list(x.shape)} and weight {list(weight.shape)}")
    torch._check(x.dtype == weight.dtype and x.is_floating_point(),
                 lambda: f"ln_ext.input_projection: input ({x.dtype}) and weight ({weight.dtype}) must share "
                         "a floating-point dtype")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("ln_ext::rnn_cell_fwd")
def _rnn_cell_fwd_fake(xproj, hproj, gamma, beta, eps, relu=False):
    H = _check_hproj(hproj, 1, "rnn_cell_fwd", xproj=xproj, gamma=gamma, beta=beta)
    torch._check(xproj.shape == hproj.shape, lambda: "ln_ext.rnn_cell_fwd: xproj must have hproj's shape")
    return _rows(hproj, H), _acc_rows(hproj, 2)


@torch.library.register_fake("ln_ext::rnn_cell_bwd")
def _rnn_cell_bwd_fake(dh, xproj, hproj, stats, gamma, beta, relu=False):
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


def _rnn_cell_composite(xproj, hproj, gamma, beta, eps, relu=False):
    return ((torch.relu if relu else torch.tanh)(_ln(xproj + hproj, gamma, beta, eps)),)


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
    xproj, hproj, gamma, beta, eps, relu = inputs
    _, stats = output
    ctx.save_for_backward(xproj, hproj, stats, gamma, beta)
    ctx.eps, ctx.relu = eps, relu
    ctx.mark_non_differentiable(stats)


def _rnn_backward(ctx, dh, _dstats):
    xproj, hproj, stats, gamma, beta = ctx.saved_tensors
    if torch.is_grad_enabled():
        ctx.composite_inputs = (xproj, hproj, gamma, beta, ctx.eps, ctx.relu)
        return _composite_grads(ctx, _rnn_cell_composite, (dh,))
    da, dgamma_rows, dbeta_rows = _ops.rnn_cell_bwd(dh, xproj, hproj, stats, gamma, beta, ctx.relu)
    return _keep(ctx.needs_input_grad, da, da, _colsum(dgamma_rows, gamma),
                 _colsum(dbeta_rows, beta), None, None)


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


# ---------------------------------------------------------------- one step, and a sequence by steps

def cell_step(mode: str, xs: tuple, state: tuple, weight_hh, params: tuple, eps: float, relu: bool = False,
              weight_hr=None) -> tuple:
    """One time step with per-step autograd: xs the step's input terms, state (h,) or
    (h, c), params the cell op's parameters in its argument order; relu: the LN-RNN's
    nonlinearity is relu (else tanh); weight_hr: the LSTM's projection of h."""
    h = state[0]
    hproj = torch.mm(h, weight_hh.t())
    if mode == "LSTM":
        h, c, _, _ = _ops.lstm_cell_fwd(xs[0], hproj, state[1], *params, eps)
        return (h if weight_hr is None else torch.mm(h, weight_hr.t())), c
    if mode == "GRU":
        h, _, _ = _ops.gru_cell_fwd(xs[0], xs[1], hproj, h, *params, eps)
        return (h,)
    h, _ = _ops.rnn_cell_fwd(xs[0], hproj, *params, eps, relu)
    return (h,)


def _resize(s, init, n):
    """The first n rows of the state s, with rows s lacks taken from init: the batch of a
    packed sequence shrinks (sequences end) forwards in time and grows backwards."""
    m = s.shape[0]
    if m == n:
        return s
    return s[:n] if m > n else torch.cat([s, init[m:n]])


def sequence_by_steps(mode, xs, weight_hh, state, params, eps, reverse, sizes=None, relu=False, weight_hr=None):
    """The sequence ops' math with per-step autograd of the cell ops, for gradients that
    must themselves be differentiable. xs [T, B, n] (sizes None) or packed [sum(sizes), n];
    returns (output, *final_state), the final state of each row at its own last step."""
    packed = sizes is not None
    per_step = list(zip(*(t.split(sizes) if packed else t.unbind(0) for t in xs)))
    T = len(per_step)
    outs, ended, init = [None] * T, [], state
    if packed and T:  # the rows of the first step run (all but in reverse)
        state = tuple(s[: sizes[T - 1 if reverse else 0]] for s in state)
    for t in (reversed(range(T)) if reverse else range(T)):
        if packed:
            bs = sizes[t]
            if bs < state[0].shape[0]:  # rows bs.. ended at the step before: final state
                ended.append(tuple(s[bs:] for s in state))
            state = tuple(_resize(s, s0, bs) for s, s0 in zip(state, init))
        state = cell_step(mode, per_step[t], state, weight_hh, params, eps, relu, weight_hr)
        outs[t] = state[0]
    if ended:
        state = tuple(torch.cat([s] + [e[k] for e in reversed(ended)]) for k, s in enumerate(state))
    if not T:  # h's features: weight_hh's columns (the projection's size with one)
        return (xs[0].new_zeros((*xs[0].shape[:-1], weight_hh.shape[1])), *state)
    return ((torch.cat(outs) if packed else torch.stack(outs)), *state)


# ---------------------------------------------------------------- sequence ops
# One layer-direction over a whole sequence (csrc/rnn_sequence.cpp). Forward op
# arguments: (*xs, weight_hh, *h0 [, c0], *params, batch_sizes, reverse, eps, *flags), where
# xs are the input terms (GRU: xzr, xn), params the cell op's and flags RNN (relu, save),
# LSTM (save, weight_hr), GRU (save,); results (output, h_n [, c_n], *saved). The backward
# op's results are the gradients of the forward's tensor arguments in the same order (the
# LSTM's d_weight_hr last).

_N_XS = {"RNN": 1, "LSTM": 1, "GRU": 2}
_N_STATES = {"RNN": 1, "LSTM": 2, "GRU": 1}
_N_PARAMS = {"RNN": 2, "LSTM": 4, "GRU": 2}
_SEQUENCE_OP = {"RNN": "rnn_sequence", "LSTM": "lstm_sequence", "GRU": "gru_sequence"}


def _check_sequence(op, weight_hh, n_gates, batch_sizes, weight_hr=None, **operands) -> int:
    """H of weight_hh [n_gates * H, H], or [n_gates * H, P] beside weight_hr [P, H] (the LSTM's
    projection); operands on weight_hh's device, batch_sizes on the CPU."""
    check_same_device(op, "weight_hh", weight_hh, weight_hr=weight_hr, **operands)
    if weight_hr is None:
        torch._check(weight_hh.dim() == 2 and weight_hh.shape[0] == n_gates * weight_hh.shape[1],
                     lambda: f"ln_ext.{op}: weight_hh must be [{n_gates} * hidden, hidden], "
                             f"got {list(weight_hh.shape)}")
    else:
        torch._check(weight_hh.dim() == 2 and weight_hh.shape[0] % n_gates == 0 and weight_hr.dim() == 2
                     and weight_hr.shape[0] == weight_hh.shape[1]
                     and weight_hr.shape[1] == weight_hh.shape[0] // n_gates,
                     lambda: f"ln_ext.{op}: weight_hh must be [{n_gates} * hidden, proj_size] and weight_hr "
                             "[proj_size, hidden]")
    if batch_sizes is not None:
        torch._check(batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64,
                     lambda: f"ln_ext.{op}: batch_sizes must be a 1-D int64 tensor on the CPU")
    return weight_hh.shape[0] // n_gates


def _seq(like, n, acc=False):
    """A new sequence tensor with like's leading dims and n features."""
    return like.new_empty((*like.shape[:-1], n), dtype=_acc_dtype(like) if acc else like.dtype)


def _saved(save, like, n, acc=False):
    """A saved sequence tensor of a forward op, or the empty one an inference run returns."""
    if save:
        return _seq(like, n, acc)
    return like.new_empty((0,), dtype=_acc_dtype(like) if acc else like.dtype)


@torch.library.register_fake("ln_ext::rnn_sequence_fwd")
def _rnn_sequence_fwd_fake(xproj, weight_hh, h0, gamma, beta, batch_sizes, reverse, eps, relu=False, save=True):
    H = _check_sequence("rnn_sequence_fwd", weight_hh, 1, batch_sizes, xproj=xproj, h0=h0, gamma=gamma, beta=beta)
    return _seq(xproj, H), torch.empty_like(h0), _saved(save, xproj, H), _saved(save, xproj, 2, acc=True)


@torch.library.register_fake("ln_ext::rnn_sequence_bwd")
def _rnn_sequence_bwd_fake(grad_output, grad_h_n, xproj, weight_hh, h0, output, hproj, stats, gamma, beta,
                           batch_sizes, reverse, relu=False):
    _check_sequence("rnn_sequence_bwd", weight_hh, 1, batch_sizes, grad_output=grad_output, grad_h_n=grad_h_n,
                    xproj=xproj, h0=h0, output=output, hproj=hproj, stats=stats, gamma=gamma, beta=beta)
    return (torch.empty_like(xproj), torch.empty_like(weight_hh), torch.empty_like(h0), torch.empty_like(gamma),
            torch.empty_like(beta))


@torch.library.register_fake("ln_ext::lstm_sequence_fwd")
def _lstm_sequence_fwd_fake(xgates, weight_hh, h0, c0, gamma_h, bias, gamma_c, beta_c, batch_sizes, reverse, eps,
                            save=True, weight_hr=None):
    H = _check_sequence("lstm_sequence_fwd", weight_hh, 4, batch_sizes, weight_hr, xgates=xgates, h0=h0, c0=c0,
                        gamma_h=gamma_h, bias=bias, gamma_c=gamma_c, beta_c=beta_c)
    return (_seq(xgates, weight_hh.shape[1]), torch.empty_like(h0), torch.empty_like(c0), _saved(save, xgates, 4 * H),
            _saved(save, xgates, H), _saved(save, xgates, 4 * H, acc=True), _saved(save, xgates, 4, acc=True),
            _saved(save and weight_hr is not None, xgates, H))


@torch.library.register_fake("ln_ext::lstm_sequence_bwd")
def _lstm_sequence_bwd_fake(grad_output, grad_h_n, grad_c_n, weight_hh, h0, c0, output, hproj, cs, gates, stats,
                            gamma_h, gamma_c, beta_c, batch_sizes, reverse, weight_hr=None, h_full=None):
    H = _check_sequence("lstm_sequence_bwd", weight_hh, 4, batch_sizes, weight_hr, grad_output=grad_output,
                        grad_h_n=grad_h_n, grad_c_n=grad_c_n, h0=h0, c0=c0, output=output, hproj=hproj, cs=cs,
                        gates=gates, stats=stats, gamma_h=gamma_h, gamma_c=gamma_c, beta_c=beta_c, h_full=h_full)
    d_weight_hr = torch.empty_like(weight_hr) if weight_hr is not None else weight_hh.new_empty((0,))
    return (_seq(output, 4 * H), torch.empty_like(weight_hh), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(gamma_h), torch.empty_like(gamma_h), torch.empty_like(gamma_c), torch.empty_like(beta_c),
            d_weight_hr)


@torch.library.register_fake("ln_ext::gru_sequence_fwd")
def _gru_sequence_fwd_fake(xzr, xn, weight_hh, h0, gamma_h, beta_h, batch_sizes, reverse, eps, save=True):
    H = _check_sequence("gru_sequence_fwd", weight_hh, 3, batch_sizes, xzr=xzr, xn=xn, h0=h0, gamma_h=gamma_h,
                        beta_h=beta_h)
    return (_seq(xn, H), torch.empty_like(h0), _saved(save, xn, 3 * H), _saved(save, xn, 4 * H, acc=True),
            _saved(save, xn, 4, acc=True))


@torch.library.register_fake("ln_ext::gru_sequence_bwd")
def _gru_sequence_bwd_fake(grad_output, grad_h_n, weight_hh, h0, output, hproj, gates, stats, gamma_h, batch_sizes,
                           reverse):
    H = _check_sequence("gru_sequence_bwd", weight_hh, 3, batch_sizes, grad_output=grad_output, grad_h_n=grad_h_n,
                        h0=h0, output=output, hproj=hproj, gates=gates, stats=stats, gamma_h=gamma_h)
    return (_seq(output, 2 * H), _seq(output, H), torch.empty_like(weight_hh), torch.empty_like(h0),
            torch.empty_like(gamma_h), torch.empty_like(gamma_h))


def _sequence_autograd(mode: str) -> None:
    n_xs, n_states = _N_XS[mode], _N_STATES[mode]
    n_tensors = n_xs + 1 + n_states + _N_PARAMS[mode]
    # After the tensors: batch_sizes, reverse, eps, then RNN: relu, save; LSTM: save,
    # weight_hr (a differentiable tensor, or None); GRU: save.
    n_trailing = {"RNN": 5, "LSTM": 5, "GRU": 4}[mode]

    def setup(ctx, inputs, output):
        tensors = inputs[:n_tensors]
        batch_sizes, reverse, eps = inputs[n_tensors: n_tensors + 3]
        ctx.relu = mode == "RNN" and inputs[n_tensors + 3]
        weight_hr = inputs[-1] if mode == "LSTM" else None
        ctx.projected = weight_hr is not None
        n_out = 1 + n_states
        ctx.mark_non_differentiable(*output[n_out:])
        # Otherwise autograd fills a zero gradient for each saved output (hproj, gates...:
        # [T * B, 4H] each) on every backward; a None gradient is handled below.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *output[:1], *output[n_out:], *([weight_hr] if ctx.projected else []))
        ctx.batch_sizes, ctx.reverse, ctx.eps = batch_sizes, reverse, eps

    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        weight_hr = saved.pop() if ctx.projected else None
        tensors, output, kept = saved[:n_tensors], saved[n_tensors], saved[n_tensors + 1:]
        xs, weight_hh = tensors[:n_xs], tensors[n_xs]
        states, params = tensors[n_xs + 1: n_xs + 1 + n_states], tensors[n_xs + 1 + n_states:]
        d_out = grads[0] if grads[0] is not None else torch.zeros_like(output)
        d_finals = [g if g is not None else torch.zeros_like(s) for g, s in zip(grads[1: 1 + n_states], states)]
        if torch.is_grad_enabled():  # create_graph: differentiable gradients, by steps
            result = _sequence_grads_by_steps(ctx, mode, tensors, weight_hr, [d_out, *d_finals])
        else:
            bs, rev = ctx.batch_sizes, ctx.reverse
            if mode == "RNN":
                args = (d_out, *d_finals, xs[0], weight_hh, *states, output, *kept, *params, bs, rev, ctx.relu)
            elif mode == "LSTM":
                gamma_h, _, gamma_c, beta_c = params
                *kept, h_full = kept
                args = (d_out, *d_finals, weight_hh, *states, output, *kept, gamma_h, gamma_c, beta_c, bs, rev,
                        weight_hr, h_full if ctx.projected else None)
            else:
                args = (d_out, *d_finals, weight_hh, *states, output, *kept, params[0], bs, rev)
            result = getattr(_ops, _SEQUENCE_OP[mode] + "_bwd")(*args)
        # The gradients of the tensors, then of batch_sizes... (none) and, LSTM, of weight_hr.
        trailing = [None] * n_trailing
        if ctx.projected:
            trailing[-1] = result[n_tensors]
        return _keep(ctx.needs_input_grad, *result[:n_tensors], *trailing)

    torch.library.register_autograd(f"ln_ext::{_SEQUENCE_OP[mode]}_fwd", backward, setup_context=setup)


def _sequence_grads_by_steps(ctx, mode, tensors, weight_hr, grads):
    n_xs, n_states = _N_XS[mode], _N_STATES[mode]
    xs, weight_hh = tensors[:n_xs], tensors[n_xs]
    states, params = tensors[n_xs + 1: n_xs + 1 + n_states], tensors[n_xs + 1 + n_states:]
    sizes = None if ctx.batch_sizes is None else ctx.batch_sizes.tolist()
    inputs = list(tensors) + ([weight_hr] if weight_hr is not None else [])
    needs = list(ctx.needs_input_grad[: len(tensors)]) + ([ctx.needs_input_grad[-1]] if weight_hr is not None else [])
    wanted = [i for i, n in enumerate(needs) if n]
    outs = sequence_by_steps(mode, xs, weight_hh, states, params, ctx.eps, ctx.reverse, sizes, ctx.relu, weight_hr)
    got = torch.autograd.grad(outs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, got):
        result[i] = g
    return tuple(result)


for _mode in _SEQUENCE_OP:
    _sequence_autograd(_mode)


def sequence(mode, xs, weight_hh, state, params, batch_sizes, reverse, eps, relu=False, weight_hr=None) -> tuple:
    """One layer-direction over a sequence in one op: (output, *final_state). Without a
    gradient to compute (grad mode off, or no input that requires one), the op saves
    nothing for a backward. weight_hr: the LSTM's projection (nn.LSTM's proj_size)."""
    fwd = getattr(_ops, _SEQUENCE_OP[mode] + "_fwd")
    tensors = (*xs, weight_hh, *state, *params) + ((weight_hr,) if weight_hr is not None else ())
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    flags = {"RNN": (relu, save), "LSTM": (save, weight_hr), "GRU": (save,)}[mode]
    # No graph to record (and not tracing): past the Python autograd kernel (~5 us a call).
    through_autograd = save or torch.compiler.is_compiling()
    with contextlib.nullcontext() if through_autograd else torch._C._AutoDispatchBelowAutograd():
        result = fwd(*xs, weight_hh, *state, *params, batch_sizes, reverse, eps, *flags)
    return result[: 1 + _N_STATES[mode]]
