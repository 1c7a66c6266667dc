"""Pure-PyTorch references of the paper's equations, in whatever dtype they are given.

Tests and benchmarks compare the kernels against these in float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _norm_dims(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(x.dim() - len(normalized_shape), x.dim()))


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Eq. 3: mean and (biased) variance over the trailing dims, then gain and bias."""
    dims = _norm_dims(x, normalized_shape)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def layer_norm_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    normalized_ndim: int,
    weight: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of `layer_norm`, written with differentiable ops.

    Computed in float32 or better; the caller casts to the tensors' dtypes.
    dweight/dbias are over the normalized dims (None weight counts as ones).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dy = x.to(acc), dy.to(acc)
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    row_dims = tuple(range(x.dim() - normalized_ndim))
    mean = x.mean(dim=dims, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(dim=dims, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * weight.to(acc)
    dx = rstd * (g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True))
    dweight, dbias = dy * xhat, dy
    if row_dims:  # sum(dim=()) would sum over every dim, not over none
        dweight, dbias = dweight.sum(dim=row_dims), dbias.sum(dim=row_dims)
    return dx, dweight, dbias


# ---------------------------------------------------------------- LN-RNNs (issue 4)
# Paper-exact equations, one time step per call, in the dtype they are given.
# `p` holds one layer-direction's parameters under the modules' base names
# (ln_ext.LayerNormLSTM.layer_parameters); a missing shift (bias=False) is None.
# Gate order as torch.nn: LSTM (i, f, g=u, o), GRU (z, r, n).

def _ln_last(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    return layer_norm(x, (x.shape[-1],), weight, bias, eps)


def ln_rnn_cell(x, h, p, eps=1e-5, nonlinearity="tanh"):
    """Eq. 4: a = W_h h + W_x x;  h' = tanh(LN(a; g, b)) (or relu, as nn.RNN's nonlinearity)."""
    a = h @ p["weight_hh"].T + x @ p["weight_ih"].T
    act = torch.relu if nonlinearity == "relu" else torch.tanh
    return act(_ln_last(a, p["ln_weight"], p["ln_bias"], eps))


def ln_lstm_cell(x, h, c, p, eps=1e-5):
    """[i, f, u, o] = LN(W_h h; g_h, b_h) + LN(W_x x; g_x, b_x) + b (each LN over 4H);
    c' = s(f) c + s(i) tanh(u);  h' = s(o) tanh(LN(c'; g_c, b_c))."""
    pre = (_ln_last(h @ p["weight_hh"].T, p["ln_hh_weight"], p["ln_hh_bias"], eps)
           + _ln_last(x @ p["weight_ih"].T, p["ln_ih_weight"], p["ln_ih_bias"], eps))
    if p["gate_bias"] is not None:
        pre = pre + p["gate_bias"]
    i, f, u, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
    h = torch.sigmoid(o) * torch.tanh(_ln_last(c, p["ln_cell_weight"], p["ln_cell_bias"], eps))
    if p.get("weight_hr") is not None:  # nn.LSTM's proj_size
        h = h @ p["weight_hr"].T
    return h, c


def ln_gru_cell(x, h, p, eps=1e-5):
    """[z, r] = s(LN(W_h h) + LN(W_x x)) (each LN over 2H);
    h~ = tanh(LN(W x) + s(r) * LN(U h)) (each LN over H);  h' = (1 - z) h + z h~."""
    H = h.shape[-1]

    def part(name, lo, hi):
        w = p[name]
        return None if w is None else w[lo:hi]

    def ln(v, kind, lo, hi):
        return _ln_last(v, part(f"ln_{kind}_weight", lo, hi), part(f"ln_{kind}_bias", lo, hi), eps)

    wx, wh = p["weight_ih"], p["weight_hh"]
    zr = ln(x @ wx[: 2 * H].T, "ih", 0, 2 * H) + ln(h @ wh[: 2 * H].T, "hh", 0, 2 * H)
    z, r = torch.sigmoid(zr).chunk(2, dim=-1)
    n = torch.tanh(ln(x @ wx[2 * H:].T, "ih", 2 * H, 3 * H) + r * ln(h @ wh[2 * H:].T, "hh", 2 * H, 3 * H))
    return (1 - z) * h + z * n


def ln_rnn_layers(mode, x, hx, params, eps=1e-5, nonlinearity="tanh"):
    """A stack of LN-RNN layers over a whole sequence, no dropout.

    mode: "RNN" (with nonlinearity "tanh" or "relu"), "LSTM" or "GRU"; x: [T, B, input_size];
    hx: (h0,) or (h0, c0) with
    each [L * D, B, H]; params[layer][direction]: dicts as for the cells.
    Returns (output [T, B, D * H], final states shaped like hx).
    """
    D = len(params[0])
    finals = [[] for _ in hx]
    for layer, dirs in enumerate(params):
        outs = []
        for d, p in enumerate(dirs):
            state = tuple(s[layer * D + d] for s in hx)
            steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
            ys = [None] * x.shape[0]
            for t in steps:
                if mode == "LSTM":
                    state = ln_lstm_cell(x[t], *state, p, eps)
                elif mode == "GRU":
                    state = (ln_gru_cell(x[t], state[0], p, eps),)
                else:
                    state = (ln_rnn_cell(x[t], state[0], p, eps, nonlinearity),)
                ys[t] = state[0]
            outs.append(torch.stack(ys) if ys else x.new_zeros((0, x.shape[1], state[0].shape[-1])))
            for k, s in enumerate(state):
                finals[k].append(s)
        x = torch.cat(outs, dim=-1)
    return x, tuple(torch.stack(f) for f in finals)
