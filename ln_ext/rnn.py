"""Layer-normalized RNNs (Ba, Kiros & Hinton 2016, eq. 4 and supplement) with the
interface of torch.nn.RNN / LSTM / GRU and their cells.

Per layer and direction, a sequence runs as:
  1. the input projection of all time steps as one GEMM, and (LSTM, GRU) its
     layer norm for all T*B rows in one launch of ln_ext's LayerNorm op;
  2. ONE sequence op (torch.ops.ln_ext.*_sequence_fwd, csrc/rnn_sequence.cpp) that
     loops over time in C++: per step one GEMM for W_h h and the fused cell kernel
     for everything element-wise (the layer norm(s) of W_h h, the sum with the
     normalized input projection and the bias, the gate nonlinearities, the state
     update, LN(c) for the LSTM, and the output).
Its backward is one op too (*_sequence_bwd): per step the fused backward cell and one
GEMM for the gradient reaching h_{t-1}; then weight_hh's gradient is one GEMM over all
rows of all steps and each LN gain/shift and bias gradient one fixed-order sum over
all rows; weight_ih's gradient is one GEMM (autograd of step 1). A PackedSequence runs
inside the same ops on its packed data: step t works on the first batch_sizes[t] rows.
The cells, and gradients that must be differentiable (create_graph), use per-step
autograd of the cell ops (rnn_ops.py) instead.

Parameters of layer k (suffix `_l{k}`, plus `_reverse` for the backward direction),
G = 1 (RNN), 4 (LSTM: gates i, f, g, o) or 3 (GRU: z, r, n):
  weight_ih [G*H, input], weight_hh [G*H, H]    uniform(-1/sqrt(H), 1/sqrt(H)), as nn.LSTM
  RNN:  ln_weight, ln_bias [H]                   LN(W_x x + W_h h)
  LSTM: ln_ih_weight, ln_ih_bias [4H]            LN(W_x x)
        ln_hh_weight, ln_hh_bias [4H]            LN(W_h h)
        gate_bias [4H]                           b; its forget slice starts at forget_bias
        ln_cell_weight, ln_cell_bias [H]         LN(c) on the output path
  GRU:  ln_ih_weight, ln_ih_bias [3H]            LN(W_x x) over [z, r] (2H) and over n (H)
        ln_hh_weight, ln_hh_bias [3H]            the same for W_h h
LN gains start at 1 and every shift at 0. bias=False drops every shift (the `*_bias`
parameters and b). The LSTM's b and its two LN shifts all add to the same
pre-activation: redundant, but as in the paper; the cell op receives b_h + b as one
vector. Under autocast a layer computes in the autocast dtype, as nn.LSTM does.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import rnn_ops
from .ops import has_cuda_kernels, layer_norm

_ops = torch.ops.ln_ext
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


def _param_shapes(mode: str, input_size: int, H: int, bias: bool, proj_size: int = 0) -> dict:
    """Base name -> (shape, init) of one layer-direction's (or one cell's) parameters;
    proj_size > 0 (LSTM): h is projected to proj_size features by weight_hr, as nn.LSTM's."""
    G = _GATES[mode] * H
    shapes = {"weight_ih": ((G, input_size), "uniform"), "weight_hh": ((G, proj_size or H), "uniform")}
    if proj_size:
        shapes["weight_hr"] = ((proj_size, H), "uniform")
    if mode == "RNN":
        norms = {"ln": H}
    elif mode == "LSTM":
        norms = {"ln_ih": G, "ln_hh": G, "ln_cell": H}
        if bias:
            shapes["gate_bias"] = ((G,), "zeros")
    else:
        norms = {"ln_ih": G, "ln_hh": G}
    for prefix, n in norms.items():
        shapes[f"{prefix}_weight"] = ((n,), "ones")
        if bias:
            shapes[f"{prefix}_bias"] = ((n,), "zeros")
    return shapes


# Every base name a layer-direction may have (its bias ones included), by (mode, projected):
# built once, not on every forward.
_ALL_BASES = {(mode, projected): tuple(_param_shapes(mode, 1, 1, True, int(projected)))
              for mode in _GATES for projected in (False, True)}


def _all_bases(mode: str, proj_size: int = 0) -> tuple:
    return _ALL_BASES[mode, proj_size > 0]


def _init_params(module: nn.Module, names: dict, shapes: dict, H: int, forget_bias: float) -> None:
    """names: base name -> attribute name. nn.LSTM's init for weights; LN gains 1, shifts 0."""
    bound = 1.0 / math.sqrt(H) if H > 0 else 0.0
    with torch.no_grad():
        for base, (_, init) in shapes.items():
            p = getattr(module, names[base])
            if init == "uniform":
                p.uniform_(-bound, bound)
            elif init == "ones":
                p.fill_(1.0)
            else:
                p.zero_()
            if base == "gate_bias":  # LSTM b: the forget gate's slice
                p[H: 2 * H].fill_(forget_bias)


def _check_common(cls: str, input_size: int, hidden_size: int, forget_bias: float, bias: bool) -> None:
    if not isinstance(hidden_size, numbers.Integral) or hidden_size <= 0:
        raise ValueError(f"{cls}: hidden_size must be a positive integer, got {hidden_size!r}")
    if not isinstance(input_size, numbers.Integral) or input_size <= 0:
        raise ValueError(f"{cls}: input_size must be a positive integer, got {input_size!r}")
    if forget_bias != 0 and not bias:
        raise ValueError(f"{cls}: forget_bias={forget_bias} needs bias=True")


# ---------------------------------------------------------------- one step, functional

def _prepare(mode: str, p: dict, H: int, like: torch.Tensor) -> dict:
    """The tensors the cell ops take, built once per sequence from one layer-direction's
    parameters `p` (base name -> tensor or None). A missing shift becomes zeros."""
    G = _GATES[mode] * H

    def or_zeros(t, n):
        return t if t is not None else like.new_zeros(n)

    # Under autocast the parameters are used in the compute dtype (like nn.LSTM). The dtype
    # test first: a no-op .to() is a dispatcher call, ~1 us a parameter on every forward.
    q = {k: v if v is None or v.dtype == like.dtype else v.to(like.dtype) for k, v in p.items()}
    p = q
    if mode == "RNN":
        q["beta"] = or_zeros(p.get("ln_bias"), H)
    elif mode == "LSTM":
        shifts = [t for t in (p.get("ln_hh_bias"), p.get("gate_bias")) if t is not None]
        q["fused_gate_bias"] = sum(shifts[1:], shifts[0]) if shifts else like.new_zeros(G)
        q["beta_c"] = or_zeros(p.get("ln_cell_bias"), H)
    else:
        q["beta_h"] = or_zeros(p.get("ln_hh_bias"), G)
    return q


def _project_inputs(mode: str, x: torch.Tensor, q: dict, H: int, eps: float) -> tuple:
    """x: [..., input] -> the per-row input terms of the cell op, each [..., n]:
    RNN (W_x x,), LSTM (LN(W_x x),), GRU (LN(W_zr x), LN(W_n x)). One GEMM and one
    LN launch each over all leading rows."""
    w = q["weight_ih"]
    linear = _ops.input_projection  # F.linear without bias (its autograd where one is needed)
    if mode == "RNN":
        return (linear(x, w),)
    g, b = q["ln_ih_weight"], q.get("ln_ih_bias")
    if mode == "LSTM":
        return (layer_norm(linear(x, w), (4 * H,), g, b, eps),)

    def part(t, lo, hi):
        return None if t is None else t[lo:hi]

    return tuple(
        layer_norm(linear(x, w[lo:hi]), (hi - lo,), part(g, lo, hi), part(b, lo, hi), eps)
        for lo, hi in ((0, 2 * H), (2 * H, 3 * H))
    )


# The cell op's parameters, in its argument order, under their keys in `q`.
_CELL_PARAMS = {
    "RNN": ("ln_weight", "beta"),
    "LSTM": ("ln_hh_weight", "fused_gate_bias", "ln_cell_weight", "beta_c"),
    "GRU": ("ln_hh_weight", "beta_h"),
}


def _cell_params(mode: str, q: dict) -> tuple:
    return tuple(q[k] for k in _CELL_PARAMS[mode])


def _run_direction(mode, x, state, q, H, eps, reverse, batch_sizes, relu=False):
    """One layer-direction over a sequence: the input projection of all steps, then one
    sequence op (rnn_ops.sequence) that loops over time in C++.

    x: [T, B, input] (batch_sizes None) or packed data [sum(batch_sizes), input];
    state: (h0,) or (h0, c0), each [B, H]. Returns (output like x with H features,
    final state), the final state of each sequence taken at its own last step.
    """
    xs = _project_inputs(mode, x, q, H, eps)
    out, *final = rnn_ops.sequence(mode, xs, q["weight_hh"], state, _cell_params(mode, q), batch_sizes,
                                   reverse, eps, relu, q.get("weight_hr"))
    return out, tuple(final)


# ---------------------------------------------------------------- layers

def _check_nonlinearity(cls: str, nonlinearity) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"{cls}: unknown nonlinearity {nonlinearity!r}; choose 'tanh' or 'relu'")


class _LayerNormRNNBase(nn.Module):
    mode = ""
    _relu = False  # the LN-RNN's nonlinearity is relu (LayerNormRNN(nonlinearity='relu'))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 eps: float = 1e-5, forget_bias: float = 0.0, device=None, dtype=None, proj_size: int = 0):
        super().__init__()
        cls = type(self).__name__
        _check_common(cls, input_size, hidden_size, forget_bias, bias)
        if not isinstance(proj_size, numbers.Integral) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"{cls}: proj_size must be a non-negative integer, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"{cls}: proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")
        if not isinstance(num_layers, numbers.Integral) or num_layers <= 0:
            raise ValueError(f"{cls}: num_layers must be a positive integer, got {num_layers!r}")
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"{cls}: dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{cls}: dropout={dropout} acts between layers; with num_layers=1 it does nothing")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.eps, self.forget_bias = bidirectional, eps, forget_bias
        self.proj_size = int(proj_size)
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        self._names = []  # [layer][direction]: base name -> attribute name
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else (proj_size or hidden_size) * D
            dirs = []
            for d in range(D):
                suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
                shapes = _param_shapes(self.mode, layer_input, hidden_size, bias, proj_size)
                names = {base: base + suffix for base in shapes}
                for base, (shape, _) in shapes.items():
                    self.register_parameter(names[base], nn.Parameter(torch.empty(shape, **factory)))
                dirs.append((names, shapes))
            self._names.append(dirs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for dirs in self._names:
            for names, shapes in dirs:
                _init_params(self, names, shapes, self.hidden_size, self.forget_bias)

    def flatten_parameters(self) -> None:
        """Does nothing: kept so that code written for nn.LSTM (which packs its weights
        for cuDNN) runs unchanged. These weights need no special layout."""

    def layer_parameters(self, layer: int, direction: int = 0) -> dict:
        """Base name -> Parameter (None where bias=False drops it) of one layer-direction."""
        names, _ = self._names[layer][direction]
        return {base: getattr(self, names[base]) if base in names else None
                for base in _all_bases(self.mode, self.proj_size)}

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for key, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                             ("dropout", 0.0), ("bidirectional", False), ("proj_size", 0), ("eps", 1e-5),
                             ("forget_bias", 0.0)):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        return s

    def _num_states(self) -> int:
        return 2 if self.mode == "LSTM" else 1

    def forward(self, input, hx=None):
        data = input.data if isinstance(input, PackedSequence) else input
        amp = _amp_dtype(data)
        if amp is None:
            return self._forward(input, hx, None)
        with torch.autocast(data.device.type, enabled=False):
            return self._forward(input, hx, amp)

    def _forward(self, input, hx, amp):
        cls = type(self).__name__
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        ref = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            batch, unbatched = int(batch_sizes[0]) if len(batch_sizes) else 0, False
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError(f"{cls}: expected input to be a 2-D (unbatched) or 3-D tensor or a "
                                 f"PackedSequence, got {getattr(input, 'shape', type(input))}")
            batch_sizes = sorted_indices = unsorted_indices = None
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{cls}: input.size(-1) must be input_size={self.input_size}, got {x.shape[-1]}")
        _check_like(cls, "input", x, ref, amp)
        x = x if amp is None else x.to(amp)
        states = self._initial_states(hx, batch, unbatched, x, sorted_indices, D, amp)

        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                q = _prepare(self.mode, self.layer_parameters(layer, d), H, x)
                st = tuple(s[layer * D + d] for s in states)
                out, st = _run_direction(self.mode, x, st, q, H, self.eps, d == 1, batch_sizes, self._relu)
                outs.append(out)
                for k, s in enumerate(st):
                    finals[k].append(s)
            x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        finals = [torch.stack(f) for f in finals]

        if packed:
            output = PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                finals = [f.index_select(1, unsorted_indices) for f in finals]
        else:
            output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
            if unbatched:
                finals = [f.squeeze(1) for f in finals]
        return output, (tuple(finals) if self.mode == "LSTM" else finals[0])

    def _initial_states(self, hx, batch, unbatched, x, sorted_indices, D, amp):
        """hx as nn.LSTM/GRU/RNN take it -> tuple of [L * D, B, H] in the sorted batch order."""
        cls = type(self).__name__
        shape = (self.num_layers * D, batch, self.hidden_size)
        h_shape = shape[:2] + (self.proj_size or self.hidden_size,)  # h: the projection's size
        if hx is None:
            return (x.new_zeros(h_shape), x.new_zeros(shape))[: self._num_states()]
        if self.mode == "LSTM":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError(f"{cls}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            names = ("h_0", "c_0")
        else:
            if not isinstance(hx, torch.Tensor):
                raise ValueError(f"{cls}: hx must be a tensor h_0, got {type(hx).__name__}")
            hx, names = (hx,), ("h_0",)
        states = []
        for name, s, full in zip(names, hx, (h_shape, shape)):
            want = full[:1] + full[2:] if unbatched else full
            size = "proj_size" if name == "h_0" and self.proj_size else "hidden_size"
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                raise ValueError(f"{cls}: {name} must have shape {list(want)} "
                                 f"(num_layers * num_directions, {'' if unbatched else 'batch, '}{size}), "
                                 f"got {list(getattr(s, 'shape', []))}")
            _check_like(cls, name, s, self.weight_ih_l0, amp)
            s = s.to(x.dtype).unsqueeze(1) if unbatched else s.to(x.dtype)
            if sorted_indices is not None:
                s = s.index_select(1, sorted_indices)
            states.append(s)
        return tuple(states)


def _amp_dtype(t) -> Optional[torch.dtype]:
    """The autocast compute dtype for t's device, when autocast is on there."""
    if not isinstance(t, torch.Tensor) or t.device.type not in ("cuda", "cpu"):
        return None
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _check_like(cls: str, name: str, t: torch.Tensor, ref: torch.Tensor, amp=None) -> None:
    """Same device as the parameters, and same dtype unless autocast decides it (amp)."""
    if t.device != ref.device:
        raise ValueError(f"{cls}: {name} is on {t.device} but the parameters are on {ref.device}")
    if amp is not None and not t.is_floating_point():
        raise ValueError(f"{cls}: {name} must be a floating-point tensor, got {t.dtype}")
    if amp is None and t.dtype != ref.dtype:
        raise ValueError(f"{cls}: {name} has dtype {t.dtype} but the parameters are {ref.dtype}")
    if t.is_cuda and not has_cuda_kernels():
        raise RuntimeError(f"{cls}: {name} is a CUDA tensor but this ln_ext build has no CUDA kernels")


class LayerNormRNN(_LayerNormRNNBase):
    """nn.RNN with layer normalization (eq. 4): h_t = tanh(LN(W_h h_{t-1} + W_x x_t)), or
    relu(...) with nonlinearity='relu'. Arguments in nn.RNN's order.

    forward(input, hx=None) -> (output, h_n), shapes as nn.RNN; input may be a PackedSequence.
    """
    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, eps=1e-5, device=None, dtype=None):
        _check_nonlinearity(type(self).__name__, nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, eps, 0.0, device, dtype)
        self.nonlinearity, self._relu = nonlinearity, nonlinearity == "relu"

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (", nonlinearity='relu'" if self._relu else "")


class LayerNormLSTM(_LayerNormRNNBase):
    """nn.LSTM with layer normalization (paper supplement); see the module docstring.

    forward(input, hx=None) -> (output, (h_n, c_n)), shapes as nn.LSTM; input may be a
    PackedSequence. forget_bias: initial value of b's forget-gate slice (paper: 0).
    proj_size > 0: as nn.LSTM's, h = W_hr (s(o) tanh(LN(c))) with proj_size features
    (weight_hr_l{k}), which the next step's W_h h and the output see.
    """
    mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, eps=1e-5, forget_bias=0.0, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, eps, forget_bias, device, dtype, proj_size)


class LayerNormGRU(_LayerNormRNNBase):
    """nn.GRU with layer normalization (paper supplement); see the module docstring.

    forward(input, hx=None) -> (output, h_n), shapes as nn.GRU; input may be a PackedSequence.
    """
    mode = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, eps=1e-5, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, eps, 0.0, device, dtype)


# ---------------------------------------------------------------- cells

class _LayerNormCellBase(nn.Module):
    mode = ""
    _relu = False  # as _LayerNormRNNBase's

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5,
                 forget_bias: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_common(type(self).__name__, input_size, hidden_size, forget_bias, bias)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.eps, self.forget_bias = eps, forget_bias
        self._shapes = _param_shapes(self.mode, input_size, hidden_size, bias)
        for base, (shape, _) in self._shapes.items():
            self.register_parameter(base, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_params(self, {b: b for b in self._shapes}, self._shapes, self.hidden_size, self.forget_bias)

    def layer_parameters(self, layer: int = 0, direction: int = 0) -> dict:
        """Base name -> Parameter (None where bias=False drops it), as the layers' method."""
        return {base: getattr(self, base) if base in self._shapes else None for base in _all_bases(self.mode)}

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        if self.forget_bias:
            s += f", forget_bias={self.forget_bias}"
        return s

    def _cell(self, input, hx):
        amp = _amp_dtype(input)
        if amp is None:
            return self._cell_step(input, hx, None)
        with torch.autocast(input.device.type, enabled=False):
            return self._cell_step(input, hx, amp)

    def _cell_step(self, input, hx, amp):
        cls = type(self).__name__
        if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
            raise ValueError(f"{cls}: expected input to be 1-D (unbatched) or 2-D [batch, input_size], "
                             f"got {getattr(input, 'shape', type(input))}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{cls}: input.size(-1) must be input_size={self.input_size}, got {input.shape[-1]}")
        _check_like(cls, "input", input, self.weight_ih, amp)
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        x = x if amp is None else x.to(amp)
        H = self.hidden_size
        n = 2 if self.mode == "LSTM" else 1
        names = ("h", "c")[:n]
        if hx is None:
            state = (x.new_zeros((x.shape[0], H)),) * n
        else:
            if self.mode == "LSTM" and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError(f"{cls}: hx must be a tuple (h, c), got {type(hx).__name__}")
            state = tuple(hx) if self.mode == "LSTM" else (hx,)
            want = (H,) if unbatched else (x.shape[0], H)
            for name, s in zip(names, state):
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                    raise ValueError(f"{cls}: {name} must have shape {list(want)}, "
                                     f"got {list(getattr(s, 'shape', []))}")
                _check_like(cls, name, s, self.weight_ih, amp)
            state = tuple(s.to(x.dtype) for s in state)
            state = tuple(s.unsqueeze(0) for s in state) if unbatched else state
        q = _prepare(self.mode, self.layer_parameters(), H, x)
        state = rnn_ops.cell_step(self.mode, _project_inputs(self.mode, x, q, H, self.eps), state,
                                  q["weight_hh"], _cell_params(self.mode, q), self.eps, self._relu)
        return tuple(s.squeeze(0) for s in state) if unbatched else state


class LayerNormRNNCell(_LayerNormCellBase):
    """nn.RNNCell with layer normalization (tanh, or relu with nonlinearity='relu'; arguments
    in nn.RNNCell's order): forward(input, hx=None) -> h'."""
    mode = "RNN"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", eps=1e-5, device=None, dtype=None):
        _check_nonlinearity(type(self).__name__, nonlinearity)
        super().__init__(input_size, hidden_size, bias, eps, 0.0, device, dtype)
        self.nonlinearity, self._relu = nonlinearity, nonlinearity == "relu"

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nonlinearity='relu'" if self._relu else "")

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._cell(input, hx)[0]


class LayerNormLSTMCell(_LayerNormCellBase):
    """nn.LSTMCell with layer normalization: forward(input, hx=None) -> (h', c')."""
    mode = "LSTM"

    def __init__(self, input_size, hidden_size, bias=True, eps=1e-5, forget_bias=0.0,
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, eps, forget_bias, device, dtype)

    def forward(self, input: torch.Tensor, hx=None):
        return self._cell(input, hx)


class LayerNormGRUCell(_LayerNormCellBase):
    """nn.GRUCell with layer normalization: forward(input, hx=None) -> h'."""
    mode = "GRU"

    def __init__(self, input_size, hidden_size, bias=True, eps=1e-5, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, eps, 0.0, device, dtype)

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._cell(input, hx)[0]
