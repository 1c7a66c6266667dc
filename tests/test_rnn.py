"""LN-RNN layers, cells and cell ops against the float64 references of ln_ext/reference.py.

Every check compares all elements (torch.testing.assert_close: NaN never passes) on
fresh random inputs and random parameters (gains away from 1, shifts away from 0).
"""
from __future__ import annotations

import itertools

import os
import platform

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import ln_ext
from ln_ext import reference
from samples import requires_cuda, run_with_cpu_isa_cap

MODES = ("RNN", "LSTM", "GRU")
LAYER = {"RNN": ln_ext.LayerNormRNN, "LSTM": ln_ext.LayerNormLSTM, "GRU": ln_ext.LayerNormGRU}
CELL = {"RNN": ln_ext.LayerNormRNNCell, "LSTM": ln_ext.LayerNormLSTMCell, "GRU": ln_ext.LayerNormGRUCell}

# (forward atol/rtol, gradient atol/rtol) against float64; a gradient's atol is
# scaled by its largest reference element. float32: a few ulps through T steps.
# float16/bfloat16: io, states and GEMMs round to 11/8 bits every step (the cell
# computes in float32) and the LN backward amplifies the rounding of its input
# gradient. Measured (2 layers, bidirectional, H=24, T=6): fp16 up to 3e-3 fwd,
# 5e-3 grad; bf16 up to 2e-2 fwd, 4e-2 grad; the same equations written with
# torch ops in that dtype are 1.5-3x further off.
TOL = {
    torch.float64: ((1e-10, 1e-10), (1e-10, 1e-9)),
    torch.float32: ((2e-5, 2e-5), (2e-5, 1e-4)),
    torch.float16: ((1e-2, 1e-2), (2e-2, 2e-2)),
    torch.bfloat16: ((6e-2, 6e-2), (1e-1, 1e-1)),
}

cuda = pytest.mark.cuda


def n_states(mode):
    return 2 if mode == "LSTM" else 1


def randomize(module, seed=0):
    """Parameters away from their init so that every term of the equations matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.startswith("ln_") and "_weight" in name:  # gains around 1
                p.copy_(1.0 + 0.3 * r)
            elif name.startswith("weight_"):  # init scale 1/sqrt(H), kept out of chaos
                p.copy_(p.double() + 0.1 * r)
            else:  # shifts
                p.copy_(0.3 * r)
    return module


def make(mode, dtype=torch.float64, device="cpu", seed=0, **kw):
    kw.setdefault("input_size", 5)
    kw.setdefault("hidden_size", 6)
    torch.manual_seed(seed)  # the weights' own init draws from the global generator
    return randomize(LAYER[mode](**kw, dtype=dtype), seed).to(device)


def states_tuple(mode, hx):
    return hx if mode == "LSTM" else (hx,)


def ref_params(module, dtype=torch.float64):
    D = 2 if module.bidirectional else 1
    conv = lambda t: None if t is None else t.detach().to(dtype).cpu().requires_grad_()  # noqa: E731
    return [[{k: conv(v) for k, v in module.layer_parameters(l, d).items()} for d in range(D)]
            for l in range(module.num_layers)]


def sample(mode, module, T=5, B=3, dtype=None, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or module.weight_ih_l0.dtype
    D = 2 if module.bidirectional else 1
    x = torch.randn(T, B, module.input_size, generator=g, dtype=torch.float64)
    sizes = (getattr(module, "proj_size", 0) or module.hidden_size, module.hidden_size)  # h (projected), c
    hx = tuple(torch.randn(module.num_layers * D, B, sizes[k], generator=g, dtype=torch.float64)
               for k in range(n_states(mode)))
    return x.to(device, dtype), tuple(h.to(device, dtype) for h in hx)


def run_and_grads(mode, module, x, hx, seed=2):
    """Output, final states and the gradients of input, states and every parameter
    of a random linear function of output and final states."""
    x = x.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    xin = x.transpose(0, 1) if module.batch_first else x
    out, hn = module(xin, hx if mode == "LSTM" else hx[0])
    out = out.transpose(0, 1) if module.batch_first else out
    hn = states_tuple(mode, hn)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (out, *hn)]
    loss = sum((t.double() * w.double()).sum() for t, w in zip((out, *hn), weights))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x, *hx, *params])
    return out, hn, grads


def ref_run_and_grads(mode, module, x, hx, seed=2):
    params = ref_params(module)
    x = x.detach().double().cpu().requires_grad_()
    hx = tuple(h.detach().double().cpu().requires_grad_() for h in hx)
    out, hn = reference.ln_rnn_layers(mode, x, hx, params, module.eps, getattr(module, "nonlinearity", "tanh"))
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, *hn)]
    loss = sum((t * w).sum() for t, w in zip((out, *hn), weights))
    flat = [p for dirs in params for d in dirs for p in d.values() if p is not None]
    grads = torch.autograd.grad(loss, [x, *hx, *flat])
    return out, hn, grads


def assert_matches_reference(mode, module, x, hx, dtype):
    (fa, fr), (ga, gr) = TOL[dtype]
    out, hn, grads = run_and_grads(mode, module, x, hx)
    rout, rhn, rgrads = ref_run_and_grads(mode, module, x, hx)
    close = lambda a, b, at, rt, what: torch.testing.assert_close(  # noqa: E731
        a.detach().double().cpu(), b.detach(), atol=at, rtol=rt, msg=lambda m: f"{what}: {m}")
    close(out, rout, fa, fr, "output")
    for k, (a, b) in enumerate(zip(hn, rhn)):
        close(a, b, fa, fr, f"final state {k}")
    names = ["input"] + [f"state {k}" for k in range(len(hx))] + [n for n, _ in module.named_parameters()]
    assert len(grads) == len(rgrads) == len(names)
    for name, a, b in zip(names, grads, rgrads):
        scale = max(1.0, b.abs().max().item())
        close(a, b, ga * scale, gr, f"grad of {name}")


CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, batch_first=True, bias=False),
    dict(bidirectional=True, batch_first=True, hidden_size=1),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_layers_match_reference_float64(mode, config):
    module = make(mode, **config)
    x, hx = sample(mode, module, T=5, B=3)
    assert_matches_reference(mode, module, x, hx, torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layers_match_reference_reduced_precision(mode, dtype):
    module = make(mode, dtype=dtype, num_layers=2, bidirectional=True, hidden_size=24, input_size=10)
    x, hx = sample(mode, module, T=6, B=5)
    assert_matches_reference(mode, module, x, hx, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_larger_hidden_float32(mode):
    """A wider row (every column loop runs many iterations) and a batch large
    enough to spread over threads."""
    module = make(mode, dtype=torch.float32, hidden_size=200, input_size=33)
    x, hx = sample(mode, module, T=3, B=40)
    assert_matches_reference(mode, module, x, hx, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_default_hidden_state_and_unbatched_input(mode):
    module = make(mode, num_layers=2)
    x, _ = sample(mode, module, T=4, B=1)
    out, hn = module(x)  # hx=None: zeros
    zeros = tuple(torch.zeros(2, 1, module.hidden_size, dtype=torch.float64) for _ in range(n_states(mode)))
    rout, rhn = reference.ln_rnn_layers(mode, x, zeros, ref_params(module), module.eps)
    torch.testing.assert_close(out, rout.detach())
    out1, hn1 = module(x[:, 0])  # unbatched [T, input]
    torch.testing.assert_close(out1, out[:, 0])
    for a, b in zip(states_tuple(mode, hn1), states_tuple(mode, hn)):
        assert a.shape == (2, module.hidden_size)
        torch.testing.assert_close(a, b[:, 0])


# ---------------------------------------------------------------- gradcheck on the ops

def cell_op_inputs(mode, B=3, H=4, dtype=torch.float64, device="cpu", seed=3, requires_grad=True):
    """One sample-input generator for gradcheck, opcheck and the CUDA tests: the
    differentiable tensor arguments of the forward cell op (eps comes last)."""
    g = torch.Generator().manual_seed(seed)
    G = {"RNN": 1, "LSTM": 4, "GRU": 3}[mode] * H

    def r(*shape, base=0.0):
        t = base + torch.randn(*shape, generator=g, dtype=torch.float64)
        return t.to(device, dtype).requires_grad_(requires_grad)

    if mode == "RNN":
        return [r(B, H), r(B, H), r(H, base=1.0), r(H)]
    if mode == "LSTM":
        return [r(B, G), r(B, G), r(B, H), r(G, base=1.0), r(G), r(H, base=1.0), r(H)]
    return [r(B, 2 * H), r(B, H), r(B, G), r(B, H), r(G, base=1.0), r(G)]


FWD_OP = {"RNN": "rnn_cell_fwd", "LSTM": "lstm_cell_fwd", "GRU": "gru_cell_fwd"}
N_DIFF_OUT = {"RNN": 1, "LSTM": 2, "GRU": 1}


def cell_op(mode, eps=1e-5):
    op = getattr(torch.ops.ln_ext, FWD_OP[mode])
    return lambda *args: op(*args, eps)[: N_DIFF_OUT[mode]]


@pytest.mark.parametrize("mode", MODES)
def test_cell_op_gradcheck(mode):
    assert torch.autograd.gradcheck(cell_op(mode), cell_op_inputs(mode))


@pytest.mark.parametrize("mode", MODES)
def test_cell_op_gradgradcheck_through_composite(mode):
    assert torch.autograd.gradgradcheck(cell_op(mode), cell_op_inputs(mode, B=2, H=3))


@pytest.mark.parametrize("mode", MODES)
def test_layer_gradcheck_tiny(mode):
    module = make(mode, input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    x, hx = sample(mode, module, T=3, B=2)
    params = list(module.parameters())

    def f(x, *hx_and_params):
        hx = hx_and_params[: n_states(mode)]
        out, hn = torch.func.functional_call(
            module, {n: p for (n, _), p in zip(module.named_parameters(), hx_and_params[len(hx):])},
            (x, hx if mode == "LSTM" else hx[0]))
        return (out, *states_tuple(mode, hn))

    inputs = [x.requires_grad_(), *(h.requires_grad_() for h in hx), *(p.detach().requires_grad_() for p in params)]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_layer_double_backward(mode):
    """create_graph=True goes through the per-step composite path."""
    module = make(mode, input_size=2, hidden_size=2, bidirectional=True)
    x, hx = sample(mode, module, T=2, B=1)

    def f(x, weight_hh, *hx):
        out, hn = torch.func.functional_call(module, {"weight_hh_l0_reverse": weight_hh},
                                             (x, hx if mode == "LSTM" else hx[0]), strict=False)
        return (out, *states_tuple(mode, hn))

    inputs = [x.requires_grad_(), module.weight_hh_l0_reverse.detach().requires_grad_(),
              *(h.requires_grad_() for h in hx)]
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_bitwise_reproducible(mode):
    module = make(mode, dtype=torch.float32, hidden_size=64, num_layers=2)
    x, hx = sample(mode, module, T=4, B=33)
    _, _, g1 = run_and_grads(mode, module, x, hx)
    _, _, g2 = run_and_grads(mode, module, x, hx)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- PackedSequence

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_matches_each_sequence_alone(mode, bidirectional, enforce_sorted):
    module = make(mode, num_layers=2, bidirectional=bidirectional)
    lengths = [5, 3, 3, 1] if enforce_sorted else [3, 5, 1, 3]
    x, hx = sample(mode, module, T=max(lengths), B=len(lengths))
    x = x.requires_grad_()
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    out, hn = module(packed, hx if mode == "LSTM" else hx[0])
    padded, out_lengths = pad_packed_sequence(out, total_length=max(lengths))
    assert out_lengths.tolist() == lengths
    hn = states_tuple(mode, hn)
    for b, n in enumerate(lengths):
        h_b = tuple(h[:, b: b + 1].contiguous() for h in hx)
        out_b, hn_b = module(x[:n, b: b + 1], h_b if mode == "LSTM" else h_b[0])
        torch.testing.assert_close(padded[:n, b: b + 1], out_b, atol=1e-12, rtol=1e-12)
        assert torch.all(padded[n:, b] == 0), "padded outputs must be zero"
        for final, alone in zip(hn, states_tuple(mode, hn_b)):
            torch.testing.assert_close(final[:, b: b + 1], alone, atol=1e-12, rtol=1e-12)
    # Gradients flow only into the real steps.
    padded.sum().backward()
    for b, n in enumerate(lengths):
        assert torch.all(x.grad[n:, b] == 0)
        assert torch.all(x.grad[:n, b] != 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_gradients_match_each_sequence_alone(mode, bidirectional):
    """Every gradient (packed input, h0/c0, every parameter) of a random linear function
    of the packed output and of the final states equals the sum over the sequences run
    alone. Lengths with ties, two length-1 sequences, unsorted: rows end (forwards) and
    start (reverse) at several steps, and the final state of the rows that end early
    gets its own gradient."""
    module = make(mode, num_layers=2, bidirectional=bidirectional)
    lengths = [4, 1, 6, 4, 1, 3]
    T, B = max(lengths), len(lengths)
    x, hx = sample(mode, module, T=T, B=B)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(T, B, module.hidden_size * (2 if bidirectional else 1), generator=g, dtype=torch.float64)
    w_hn = [torch.randn(h.shape, generator=g, dtype=torch.float64) for h in hx]
    params = list(module.parameters())

    x_p = x.clone().requires_grad_()
    hx_p = tuple(h.clone().requires_grad_() for h in hx)
    packed = pack_padded_sequence(x_p, torch.tensor(lengths), enforce_sorted=False)
    out, hn = module(packed, hx_p if mode == "LSTM" else hx_p[0])
    padded, _ = pad_packed_sequence(out, total_length=T)
    loss = (padded * w_out).sum() + sum((h * w).sum() for h, w in zip(states_tuple(mode, hn), w_hn))
    got = torch.autograd.grad(loss, [x_p, *hx_p, *params])

    want = [torch.zeros_like(t) for t in (x, *hx, *params)]
    for b, n in enumerate(lengths):
        x_b = x[:n, b: b + 1].clone().requires_grad_()
        hx_b = tuple(h[:, b: b + 1].clone().requires_grad_() for h in hx)
        out_b, hn_b = module(x_b, hx_b if mode == "LSTM" else hx_b[0])
        loss_b = (out_b * w_out[:n, b: b + 1]).sum() + sum(
            (h * w[:, b: b + 1]).sum() for h, w in zip(states_tuple(mode, hn_b), w_hn))
        grads = torch.autograd.grad(loss_b, [x_b, *hx_b, *params])
        want[0][:n, b: b + 1] += grads[0]
        for k in range(n_states(mode)):
            want[1 + k][:, b: b + 1] += grads[1 + k]
        for k, gr in enumerate(grads[1 + n_states(mode):]):
            want[1 + n_states(mode) + k] += gr
    names = ["input"] + ["h0", "c0"][: n_states(mode)] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_packed_gradcheck_and_double_backward_tiny(mode):
    """The packed whole-sequence backward, and its create_graph fallback (per-step autograd)."""
    module = make(mode, input_size=2, hidden_size=2, bidirectional=True)
    lengths = torch.tensor([3, 1, 1])
    x, hx = sample(mode, module, T=3, B=3)
    data = pack_padded_sequence(x, lengths).data

    def f(data, weight_hh, weight_hh_rev, *hx):
        packed = pack_padded_sequence(x, lengths)._replace(data=data)
        out, hn = torch.func.functional_call(
            module, {"weight_hh_l0": weight_hh, "weight_hh_l0_reverse": weight_hh_rev},
            (packed, hx if mode == "LSTM" else hx[0]), strict=False)
        return (out.data, *states_tuple(mode, hn))

    inputs = [data.requires_grad_(), module.weight_hh_l0.detach().requires_grad_(),
              module.weight_hh_l0_reverse.detach().requires_grad_(), *(h.requires_grad_() for h in hx)]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_packed_sequence_unsorted_needs_enforce_sorted_false():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sorted"):
        pack_padded_sequence(x, torch.tensor([2, 4]), enforce_sorted=True)


# ---------------------------------------------------------------- cells

@pytest.mark.parametrize("mode", MODES)
def test_cells_step_by_step_match_the_layer(mode):
    layer = make(mode, hidden_size=7)
    cell = CELL[mode](layer.input_size, layer.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(layer, name + "_l0"))
    x, hx = sample(mode, layer, T=4, B=3)
    out, hn = layer(x, hx if mode == "LSTM" else hx[0])
    state = tuple(h[0] for h in hx)
    for t in range(x.shape[0]):
        state = states_tuple(mode, cell(x[t], state if mode == "LSTM" else state[0]))
        torch.testing.assert_close(state[0], out[t], atol=1e-12, rtol=1e-12)
    for a, b in zip(state, states_tuple(mode, hn)):
        torch.testing.assert_close(a, b[0], atol=1e-12, rtol=1e-12)
    # Unbatched input and hx=None.
    one = states_tuple(mode, cell(x[0, 0]))
    ref = states_tuple(mode, cell(x[0, :1]))
    for a, b in zip(one, ref):
        torch.testing.assert_close(a, b[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cell_matches_reference_cell(mode, dtype):
    cell = randomize(CELL[mode](6, 9, dtype=dtype))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    state = tuple(torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(n_states(mode)))
    got = states_tuple(mode, cell(x.to(dtype), tuple(s.to(dtype) for s in state) if mode == "LSTM" else state[0].to(dtype)))
    p = {k: None if v is None else v.detach().double() for k, v in cell.layer_parameters().items()}
    fn = {"RNN": reference.ln_rnn_cell, "LSTM": reference.ln_lstm_cell, "GRU": reference.ln_gru_cell}[mode]
    want = states_tuple(mode, fn(x, *state, p, cell.eps))
    (atol, rtol), _ = TOL[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- interface

def test_parameters_names_shapes_and_init():
    H, forget_bias = 8, 1.5
    m = ln_ext.LayerNormLSTM(3, H, num_layers=2, bidirectional=True, forget_bias=forget_bias)
    names = dict(m.named_parameters())
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        assert names["weight_ih" + suffix].shape == (4 * H, 3 if suffix.startswith("_l0") else 2 * H)
        assert names["weight_hh" + suffix].shape == (4 * H, H)
        bound = 1 / H ** 0.5
        assert names["weight_hh" + suffix].abs().max() <= bound
        assert names["weight_hh" + suffix].std() > bound / 4  # really drawn, not constant
        b = names["gate_bias" + suffix]
        assert torch.all(b[H: 2 * H] == forget_bias) and torch.all(b[:H] == 0) and torch.all(b[2 * H:] == 0)
        for ln in ("ln_ih", "ln_hh", "ln_cell"):
            assert torch.all(names[f"{ln}_weight{suffix}"] == 1)
            assert torch.all(names[f"{ln}_bias{suffix}"] == 0)
    gru = ln_ext.LayerNormGRU(3, H, bias=False)
    assert sorted(n for n, _ in gru.named_parameters()) == [
        "ln_hh_weight_l0", "ln_ih_weight_l0", "weight_hh_l0", "weight_ih_l0"]
    rnn = ln_ext.LayerNormRNN(3, H)
    assert sorted(n for n, _ in rnn.named_parameters()) == [
        "ln_bias_l0", "ln_weight_l0", "weight_hh_l0", "weight_ih_l0"]


@pytest.mark.parametrize("mode", MODES)
def test_output_and_state_shapes_like_torch_nn(mode):
    torch_cls = {"RNN": torch.nn.RNN, "LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[mode]
    for layers, bidir, batch_first in itertools.product((1, 3), (False, True), (False, True)):
        kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
        x = torch.randn(2, 4, 5) if batch_first else torch.randn(4, 2, 5)
        module = LAYER[mode](5, 7, **kw)
        module.flatten_parameters()  # code written for nn.LSTM calls it
        ours, theirs = module(x), torch_cls(5, 7, **kw)(x)
        assert ours[0].shape == theirs[0].shape
        for a, b in zip(states_tuple(mode, ours[1]), states_tuple(mode, theirs[1])):
            assert a.shape == b.shape


@pytest.mark.parametrize("mode", MODES)
def test_dropout_between_layers_only_in_training(mode):
    module = make(mode, num_layers=2, dropout=0.5)
    x, hx = sample(mode, module, T=4, B=3)
    hx = hx if mode == "LSTM" else hx[0]
    module.eval()
    eval_out, _ = module(x, hx)
    rout, _ = reference.ln_rnn_layers(mode, x, states_tuple(mode, hx), ref_params(module), module.eps)
    torch.testing.assert_close(eval_out, rout.detach())
    module.train()
    torch.manual_seed(0)
    a, _ = module(x, hx)
    torch.manual_seed(0)
    b, _ = module(x, hx)
    torch.manual_seed(1)
    c, _ = module(x, hx)
    assert torch.equal(a, b) and not torch.allclose(a, eval_out) and not torch.allclose(a, c)
    one_layer = make(mode, num_layers=1)
    with pytest.warns(UserWarning, match="dropout"):
        LAYER[mode](5, 6, dropout=0.3)
    one_layer.train()
    torch.testing.assert_close(one_layer(x)[0], one_layer.eval()(x)[0])


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_and_empty_sequence(mode):
    module = make(mode)
    out, hn = module(torch.randn(3, 0, 5, dtype=torch.float64))
    assert out.shape == (3, 0, 6)
    out, hn = module(torch.randn(0, 2, 5, dtype=torch.float64))
    assert out.shape == (0, 2, 6)
    assert all(torch.all(h == 0) for h in states_tuple(mode, hn))


@pytest.mark.parametrize("mode", MODES)
def test_bad_inputs_are_rejected_clearly(mode):
    module = make(mode, num_layers=2)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    cls = LAYER[mode].__name__
    with pytest.raises(ValueError, match=rf"{cls}: input.size\(-1\) must be input_size=5, got 4"):
        module(torch.randn(4, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected input to be a 2-D"):
        module(torch.randn(4, 3, 5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="input has dtype torch.float32 but the parameters are torch.float64"):
        module(x.float())
    with pytest.raises(ValueError, match="input is on meta but the parameters are on cpu"):
        module(x.to("meta"))
    bad = torch.randn(2, 4, 6, dtype=torch.float64)
    good = torch.randn(2, 3, 6, dtype=torch.float64)
    if mode == "LSTM":
        with pytest.raises(ValueError, match=r"h_0 must have shape \[2, 3, 6\]"):
            module(x, (bad, good))
        with pytest.raises(ValueError, match=r"c_0 must have shape \[2, 3, 6\]"):
            module(x, (good, bad))
        with pytest.raises(ValueError, match="hx must be a tuple"):
            module(x, good)
        with pytest.raises(ValueError, match="c_0 has dtype torch.float32"):
            module(x, (good, good.float()))
    else:
        with pytest.raises(ValueError, match=r"h_0 must have shape \[2, 3, 6\]"):
            module(x, bad)
        with pytest.raises(ValueError, match="h_0 is on meta"):
            module(x, good.to("meta"))
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        LAYER[mode](5, 0)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        LAYER[mode](5, 4, num_layers=0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\]"):
        LAYER[mode](5, 4, num_layers=2, dropout=1.5)
    cell = CELL[mode](5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be input_size=5"):
        cell(torch.randn(3, 4, dtype=torch.float64))
    state = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"h must have shape \[3, 6\]"):
        cell(torch.randn(3, 5, dtype=torch.float64), (state, state) if mode == "LSTM" else state)


def test_forget_bias_needs_bias():
    with pytest.raises(ValueError, match="forget_bias=1.0 needs bias=True"):
        ln_ext.LayerNormLSTM(3, 4, bias=False, forget_bias=1.0)


@pytest.mark.parametrize("mode", MODES)
def test_cell_ops_reject_bad_operands(mode):
    args = cell_op_inputs(mode, requires_grad=False)
    op = getattr(torch.ops.ln_ext, FWD_OP[mode])
    wrong_shape = [a.clone() for a in args]
    wrong_shape[0] = wrong_shape[0][:, :-1]
    name = {"RNN": "xproj", "LSTM": "xgates", "GRU": "xzr"}[mode]
    with pytest.raises(RuntimeError, match=rf"ln_ext.{FWD_OP[mode]}: {name} must have shape"):
        op(*wrong_shape, 1e-5)
    wrong_dtype = [a.clone() for a in args]
    wrong_dtype[0] = wrong_dtype[0].float()
    with pytest.raises(RuntimeError, match=rf"{name} must be Double \(from hproj's dtype Double\), got Float"):
        op(*wrong_dtype, 1e-5)
    ints = [a.clone() for a in args]
    hproj_index = {"RNN": 1, "LSTM": 1, "GRU": 2}[mode]
    ints[hproj_index] = ints[hproj_index].long()
    with pytest.raises(RuntimeError, match="hproj must be float32, float64, float16 or bfloat16"):
        op(*ints, 1e-5)


# ---------------------------------------------------------------- opcheck and compile

def bwd_op_sample(mode, B=3, H=4, dtype=torch.float64, device="cpu"):
    """Arguments of the backward op, from a real forward call on the shared sample."""
    ins = cell_op_inputs(mode, B=B, H=H, dtype=dtype, device=device, requires_grad=False)
    outs = getattr(torch.ops.ln_ext, FWD_OP[mode])(*ins, 1e-5)
    g = torch.Generator().manual_seed(9)
    dh = torch.randn(outs[0].shape, generator=g, dtype=torch.float64).to(device, dtype)
    if mode == "RNN":
        xproj, hproj, gamma, beta = ins
        return "rnn_cell_bwd", (dh, xproj, hproj, outs[1], gamma, beta)
    if mode == "LSTM":
        _, hproj, c_prev, gamma_h, _, gamma_c, beta_c = ins
        h, c, gates, stats = outs
        return "lstm_cell_bwd", (dh, torch.randn_like(dh), hproj, c_prev, c, gates, stats, gamma_h, gamma_c, beta_c)
    _, _, hproj, h_prev, gamma_h, _ = ins
    return "gru_cell_bwd", (dh, hproj, h_prev, outs[1], outs[2], gamma_h)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    op = getattr(torch.ops.ln_ext, FWD_OP[mode])
    torch.library.opcheck(op, (*cell_op_inputs(mode), 1e-5))
    torch.library.opcheck(op, (*cell_op_inputs(mode, B=0, requires_grad=False), 1e-5))
    name, args = bwd_op_sample(mode)
    torch.library.opcheck(getattr(torch.ops.ln_ext, name), args)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    module = make(mode, num_layers=2, bidirectional=True)
    x, hx = sample(mode, module, T=3, B=2)
    hx = hx if mode == "LSTM" else hx[0]
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    out, hn = compiled(xc, hx)
    want, want_hn = module(x, hx)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    xe = x.clone().requires_grad_()
    module(xe, hx)[0].sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_packed(mode):
    """A PackedSequence under torch.compile (graph breaks where the batch sizes are read
    on the host) gives eager's packed output, final state and input gradient."""
    torch._dynamo.reset()
    module = make(mode, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, module.input_size, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    results = []
    for run in (torch.compile(module, backend="aot_eager"), module):
        xr = x.clone().requires_grad_()
        out, state = run(pack_padded_sequence(xr, lengths, enforce_sorted=False))
        h_n = state[0] if mode == "LSTM" else state
        (out.data.square().sum() + h_n.sum()).backward()
        results.append((out.data.detach(), h_n.detach(), xr.grad))
    for got, want, name in zip(*results, ("output", "h_n", "input grad")):
        torch.testing.assert_close(got, want, msg=name)


# ---------------------------------------------------------------- sequence ops

SEQ_OP = {"RNN": "rnn_sequence", "LSTM": "lstm_sequence", "GRU": "gru_sequence"}


def sequence_op_inputs(mode, T=4, B=3, H=4, dtype=torch.float64, device="cpu", seed=6, lengths=None):
    """The forward sequence op's arguments (one sample generator for opcheck and the
    device tests): random input terms, weight_hh, states and cell parameters; packed
    (batch_sizes given) when `lengths` (decreasing) is."""
    g = torch.Generator().manual_seed(seed)
    G = {"RNN": 1, "LSTM": 4, "GRU": 3}[mode] * H
    lead = (T, B) if lengths is None else (sum(lengths),)

    def r(*shape, base=0.0, scale=1.0):
        return (base + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    xs = [r(*lead, 2 * H), r(*lead, H)] if mode == "GRU" else [r(*lead, G)]
    states = [r(B, H) for _ in range(n_states(mode))]
    cell = cell_op_inputs(mode, B=1, H=H, dtype=dtype, device=device, seed=seed, requires_grad=False)
    params = cell[{"RNN": 2, "LSTM": 3, "GRU": 4}[mode]:]
    batch_sizes = None
    if lengths is not None:
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(max(lengths))], dtype=torch.int64)
    return [*xs, r(G, H, scale=0.5), *states, *params, batch_sizes, False, 1e-5]


def sequence_bwd_sample(mode, device="cpu", **kw):
    """(bwd op name, its arguments) from a real forward call on the shared sample."""
    args = sequence_op_inputs(mode, device=device, **kw)
    outs = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")(*args)
    n_x, n_s = (2 if mode == "GRU" else 1), n_states(mode)
    xs, w, states, params = args[:n_x], args[n_x], args[n_x + 1: n_x + 1 + n_s], args[n_x + 1 + n_s: -3]
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in outs[: 1 + n_s]]
    kept = outs[1 + n_s: 7 if mode == "LSTM" else None]  # without the LSTM's h_full (no projection here)
    if mode == "RNN":
        bwd = (*grads, xs[0], w, *states, outs[0], *kept, *params)
    elif mode == "LSTM":
        bwd = (*grads, w, *states, outs[0], *kept, params[0], params[2], params[3])
    else:
        bwd = (*grads, w, *states, outs[0], *kept, params[0])
    return SEQ_OP[mode] + "_bwd", [*bwd, args[-3], args[-2]]


def assert_same_outputs_and_grads(got, want, leaves):
    """float64 outputs within 1e-12 of each other, and the gradients of a random linear
    function of them with respect to `leaves` within 1e-11."""
    g = torch.Generator().manual_seed(3)
    dys = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for k, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, dys), torch.autograd.grad(want, leaves, dys))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10, msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_sequence_op_opcheck(mode, packed):
    lengths = [4, 2, 2] if packed else None
    fwd = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")
    args = sequence_op_inputs(mode, lengths=lengths)
    for t in args:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            t.requires_grad_()
    torch.library.opcheck(fwd, args)
    name, bwd_args = sequence_bwd_sample(mode, lengths=lengths)
    torch.library.opcheck(getattr(torch.ops.ln_ext, name), bwd_args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_sequence_op_matches_per_step_autograd(mode, reverse, packed):
    """Every output and every gradient of the sequence op (forward and backward ops) against
    the same sequence run step by step through the cell ops' autograd, in float64."""
    lengths = [5, 3, 3, 1] if packed else None
    args = sequence_op_inputs(mode, T=5, B=4, H=6, lengths=lengths)
    args[-2] = reverse
    tensors = [t.requires_grad_() for t in args[:-3]]
    n_x, n_s = (2 if mode == "GRU" else 1), n_states(mode)
    got = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")(*args)[: 1 + n_s]
    sizes = None if lengths is None else args[-3].tolist()
    want = ln_ext.rnn_ops.sequence_by_steps(mode, tensors[:n_x], tensors[n_x], tensors[n_x + 1: n_x + 1 + n_s],
                                            tensors[n_x + 1 + n_s:], 1e-5, reverse, sizes)
    assert_same_outputs_and_grads(got, want, tensors)


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_fused_lstm_backward_matches_float64(packed, num_threads):
    """The CPU's fused float32 LSTM loops (forward and backward, the parameter gradients
    summed per batch row as the backward runs): every output and every gradient of the
    sequence op against the same op in float64, packed too (rows ending at several steps),
    on 1 and 2 threads with the same bits."""
    lengths = [7, 7, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1] if packed else None
    kw = dict(T=7, B=18, H=64, lengths=lengths)  # a team of 2 splits the 18 rows
    args64 = sequence_op_inputs("LSTM", **kw)
    results = []
    for n in (1, 2):
        num_threads(n)
        args32 = sequence_op_inputs("LSTM", dtype=torch.float32, **kw)
        tensors32 = [t.float().requires_grad_() for t in args32[:-3]]
        out32 = torch.ops.ln_ext.lstm_sequence_fwd(*tensors32, *args32[-3:])[:3]
        g = torch.Generator().manual_seed(3)
        dys = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in out32]
        grads32 = torch.autograd.grad(out32, tensors32, [d.float() for d in dys])
        results.append([*out32, *grads32])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    tensors64 = [t.requires_grad_() for t in args64[:-3]]
    out64 = torch.ops.ln_ext.lstm_sequence_fwd(*tensors64, *args64[-3:])[:3]
    grads64 = torch.autograd.grad(out64, tensors64, dys)
    (fa, fr), (ga, gr) = TOL[torch.float32]
    for a, b in zip(out32, out64):
        torch.testing.assert_close(a.double(), b.detach(), atol=fa, rtol=fr)
    for k, (a, b) in enumerate(zip(grads32, grads64)):
        torch.testing.assert_close(a.double(), b, atol=ga * max(1.0, b.abs().max().item()), rtol=gr,
                                   msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_sequence_op_inference_saves_nothing(mode, packed):
    """save=False (what the layers pass without a gradient to compute): the same output
    and final states, bit for bit, and every tensor kept only for the backward empty."""
    lengths = [4, 2, 2] if packed else None
    fwd = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")
    n_s = n_states(mode)
    for reverse in (False, True):
        args = sequence_op_inputs(mode, lengths=lengths)
        args[-2] = reverse
        flags = [False] if mode == "RNN" else []  # relu
        trained = fwd(*args, *flags, True)
        inferred = fwd(*args, *flags, False)
        for a, b in zip(trained[: 1 + n_s], inferred[: 1 + n_s]):
            assert torch.equal(a, b)
        kept = slice(1 + n_s, 7 if mode == "LSTM" else None)  # the LSTM's h_full: only with a projection
        assert all(t.numel() > 0 for t in trained[kept])
        assert all(t.shape == (0,) for t in inferred[1 + n_s:])
        torch.library.opcheck(fwd, (*args, *flags, False))


@pytest.mark.parametrize("mode", MODES)
def test_layers_without_grad_save_nothing(mode, monkeypatch):
    """Under no_grad and inference_mode, and with nothing that requires grad, the layers ask
    the sequence op for no saved tensors; with a gradient to compute they do, and the
    outputs are the same."""
    module = make(mode, dtype=torch.float32, num_layers=2, bidirectional=True)
    x, hx = sample(mode, module, T=5, B=3)
    hx = hx if mode == "LSTM" else hx[0]
    fwd = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")
    asked = []

    def recording(*args):
        asked.append(args[-2] if mode == "LSTM" else args[-1])  # save (the LSTM's weight_hr follows it)
        return fwd(*args)

    monkeypatch.setattr(ln_ext.rnn_ops, "_ops", type("Ops", (), {SEQ_OP[mode] + "_fwd": staticmethod(recording)}))
    want, _ = module(x, hx)
    assert asked == [True] * 4
    for context in (torch.no_grad, torch.inference_mode):
        asked.clear()
        with context():
            got, _ = module(x, hx)
        assert asked == [False] * 4 and torch.equal(got, want)
    asked.clear()
    module.requires_grad_(False)
    got, _ = module(x, hx)
    assert asked == [False] * 4 and torch.equal(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_gradients_independent_of_thread_count(mode, num_threads):
    """Parameter gradients are fixed-order sums: 1 and 2 threads give the same bits."""
    results = []
    for n in (1, 2):
        num_threads(n)
        module = make(mode, dtype=torch.float32, hidden_size=96, input_size=16)
        x, hx = sample(mode, module, T=6, B=37)
        results.append(run_and_grads(mode, module, x, hx))
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_ops_reject_bad_operands(mode):
    fwd = getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd")
    op = f"ln_ext.{SEQ_OP[mode]}_fwd"
    args = sequence_op_inputs(mode)
    n_x = 2 if mode == "GRU" else 1
    bad = list(args)
    bad[n_x + 1] = bad[n_x + 1][:2]  # h0 with 2 rows beside a batch of 3
    with pytest.raises(RuntimeError, match=rf"{op}: .* has batch 3 but h0 has 2 rows"):
        fwd(*bad)
    bad = list(args)
    bad[n_x] = bad[n_x].float()
    with pytest.raises(RuntimeError, match=rf"{op}: .* must be Float \(from weight_hh's dtype Float\), got Double"):
        fwd(*bad)
    packed = sequence_op_inputs(mode, lengths=[3, 1, 1])
    packed[-3] = torch.tensor([3, 2], dtype=torch.int64)  # sums to 5 rows, data has 5: fine; now wrong order
    packed[-3] = torch.tensor([1, 3, 1], dtype=torch.int64)
    with pytest.raises(RuntimeError, match=rf"{op}: batch_sizes must be positive and non-increasing"):
        fwd(*packed)
    packed[-3] = torch.tensor([3, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=rf"{op}: batch_sizes must be a 1-D int64 tensor on the CPU"):
        fwd(*packed)
    packed[-3] = torch.tensor([3, 1], dtype=torch.int64)
    with pytest.raises(RuntimeError, match=rf"{op}: batch_sizes sum to 4 but .* has 5 rows"):
        fwd(*packed)


# ---------------------------------------------------------------- nonlinearity='relu' (nn.RNN's)

def make_relu(dtype=torch.float64, **kw):
    return make("RNN", dtype=dtype, nonlinearity="relu", **kw)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_relu_layers_match_reference_float64(config):
    module = make_relu(**config)
    x, hx = sample("RNN", module, T=5, B=3)
    assert_matches_reference("RNN", module, x, hx, torch.float64)


def test_relu_layers_match_reference_reduced_precision():
    """float32 outputs and gradients; bfloat16 outputs (its gradients are not compared: a
    pre-activation within bfloat16's rounding of 0 flips relu's mask, and with it a whole
    term of a weight's gradient, where float64 does not)."""
    module = make_relu(dtype=torch.float32, num_layers=2, bidirectional=True, hidden_size=24, input_size=10)
    x, hx = sample("RNN", module, T=6, B=5)
    assert_matches_reference("RNN", module, x, hx, torch.float32)
    module = make_relu(dtype=torch.bfloat16, num_layers=2, bidirectional=True, hidden_size=24, input_size=10)
    x, hx = sample("RNN", module, T=6, B=5)
    out, _ = module(x, hx[0])
    want, _ = reference.ln_rnn_layers("RNN", x.double(), (hx[0].double(),), ref_params(module), module.eps, "relu")
    (atol, rtol), _ = TOL[torch.bfloat16]
    torch.testing.assert_close(out.double(), want.detach(), atol=atol, rtol=rtol)


def test_relu_takes_nn_rnn_arguments_and_refuses_others():
    """nn.RNN's positional order (input, hidden, num_layers, nonlinearity, bias, ...), and
    nn.RNNCell's (input, hidden, bias, nonlinearity)."""
    layer = ln_ext.LayerNormRNN(5, 6, 2, "relu", False)
    assert layer.nonlinearity == "relu" and not layer.bias and layer.num_layers == 2
    assert "nonlinearity='relu'" in repr(layer) and "nonlinearity" not in repr(ln_ext.LayerNormRNN(5, 6))
    assert ln_ext.LayerNormRNNCell(5, 6, True, "relu").nonlinearity == "relu"
    torch_names = {n for n, _ in torch.nn.RNN(5, 6, 2, "relu", False).named_parameters()}
    assert torch_names <= {n for n, _ in layer.named_parameters()}
    for cls in (ln_ext.LayerNormRNN, ln_ext.LayerNormRNNCell):
        with pytest.raises(ValueError, match="unknown nonlinearity 'sigmoid'; choose 'tanh' or 'relu'"):
            cls(5, 6, nonlinearity="sigmoid")


def test_relu_packed_and_cells_match_the_layer():
    module = make_relu(num_layers=2, bidirectional=True)
    lengths = [5, 3, 1]
    x, hx = sample("RNN", module, T=5, B=3)
    out, hn = module(pack_padded_sequence(x, torch.tensor(lengths)), hx[0])
    padded, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths):
        out_b, hn_b = module(x[:n, b: b + 1], hx[0][:, b: b + 1].contiguous())
        torch.testing.assert_close(padded[:n, b: b + 1], out_b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(hn[:, b: b + 1], hn_b, atol=1e-12, rtol=1e-12)
    layer = make_relu(hidden_size=7)
    cell = ln_ext.LayerNormRNNCell(layer.input_size, 7, nonlinearity="relu", dtype=torch.float64)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(layer, name + "_l0"))
    x, hx = sample("RNN", layer, T=4, B=3)
    out, _ = layer(x, hx[0])
    h = hx[0][0]
    for t in range(4):
        h = cell(x[t], h)
        torch.testing.assert_close(h, out[t], atol=1e-12, rtol=1e-12)
    assert (out == 0).any() and (out > 0).any()  # both sides of the relu were exercised


def test_relu_ops_gradcheck_opcheck_and_per_step_match():
    ins = cell_op_inputs("RNN")
    op = torch.ops.ln_ext.rnn_cell_fwd
    assert torch.autograd.gradcheck(lambda *a: op(*a, 1e-5, True)[0], ins)
    torch.library.opcheck(op, (*ins, 1e-5, True))
    _, (dh, xproj, hproj, stats, gamma, beta) = bwd_op_sample("RNN")
    _, stats = op(xproj, hproj, gamma, beta, 1e-5, True)
    torch.library.opcheck(torch.ops.ln_ext.rnn_cell_bwd, (dh, xproj, hproj, stats, gamma, beta, True))
    fwd = torch.ops.ln_ext.rnn_sequence_fwd
    for lengths in (None, [4, 2, 2]):
        for reverse in (False, True):
            args = sequence_op_inputs("RNN", lengths=lengths)
            args[-2] = reverse
            tensors = [t.requires_grad_() for t in args[:-3]]
            torch.library.opcheck(fwd, (*args, True))
            got = fwd(*args, True)[:2]
            sizes = None if lengths is None else args[-3].tolist()
            want = ln_ext.rnn_ops.sequence_by_steps("RNN", tensors[:1], tensors[1], tensors[2:3], tensors[3:], 1e-5,
                                                    reverse, sizes, relu=True)
            assert_same_outputs_and_grads(got, want, tensors)
            tanh_out = fwd(*[t.detach() if isinstance(t, torch.Tensor) else t for t in args])[0]
            assert not torch.allclose(got[0], tanh_out)  # the flag reaches the kernel


def test_relu_gradient_is_torch_threshold_backward():
    """Columns whose output relu zeroed pass back exactly 0, even for an inf gradient (torch's
    threshold_backward: 0 where the output is <= 0), so da stays finite."""
    xproj, hproj, gamma, beta = cell_op_inputs("RNN", B=5, H=8, requires_grad=False)
    h, stats = torch.ops.ln_ext.rnn_cell_fwd(xproj, hproj, gamma, beta, 1e-5, True)
    masked = h == 0
    assert masked.any() and (~masked).any()
    dh = torch.randn_like(h)
    dh[masked] = float("inf")
    da, dgamma_rows, dbeta_rows = torch.ops.ln_ext.rnn_cell_bwd(dh, xproj, hproj, stats, gamma, beta, True)
    assert torch.isfinite(da).all()
    assert (dbeta_rows[masked] == 0).all() and (dgamma_rows[masked] == 0).all()
    torch.testing.assert_close(dbeta_rows[~masked], dh[~masked])


def test_relu_double_backward_compile_and_export():
    module = make_relu(input_size=2, hidden_size=3, bidirectional=True)
    x, hx = sample("RNN", module, T=2, B=2)

    def f(x, weight_hh, h0):
        out, hn = torch.func.functional_call(module, {"weight_hh_l0_reverse": weight_hh}, (x, h0), strict=False)
        return out, hn

    assert torch.autograd.gradgradcheck(f, [x.clone().requires_grad_(),
                                            module.weight_hh_l0_reverse.detach().requires_grad_(),
                                            hx[0].clone().requires_grad_()])
    torch._dynamo.reset()
    model = make_relu(dtype=torch.float32, num_layers=2, bidirectional=True)
    xs = torch.randn(6, 2, 5)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(xs)[0], model(xs)[0])
    ep = torch.export.export(model, (xs,))
    assert any("rnn_sequence" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(xs)[0], model(xs)[0])


# ---------------------------------------------------------------- proj_size (nn.LSTM's)

PROJ_CONFIGS = [dict(proj_size=3), dict(proj_size=2, num_layers=2, bidirectional=True),
                dict(proj_size=4, num_layers=2, batch_first=True, bias=False)]


@pytest.mark.parametrize("config", PROJ_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_projected_lstm_matches_reference_float64(config):
    module = make("LSTM", **config)
    x, hx = sample("LSTM", module, T=5, B=3)
    assert hx[0].shape[-1] == config["proj_size"] and hx[1].shape[-1] == module.hidden_size
    assert_matches_reference("LSTM", module, x, hx, torch.float64)


def test_projected_lstm_reduced_precision_and_default_state():
    module = make("LSTM", dtype=torch.float32, num_layers=2, bidirectional=True, hidden_size=24, input_size=10,
                  proj_size=8)
    x, hx = sample("LSTM", module, T=6, B=5)
    assert_matches_reference("LSTM", module, x, hx, torch.float32)
    out, (h_n, c_n) = module(x)
    assert out.shape == (6, 5, 16) and h_n.shape == (4, 5, 8) and c_n.shape == (4, 5, 24)
    out1, (h1, c1) = module(x[:, 0])  # unbatched
    torch.testing.assert_close(out1, out[:, 0])
    assert h1.shape == (4, 8) and c1.shape == (4, 24)


def test_projected_lstm_takes_nn_lstm_arguments_and_refuses_others():
    layer = ln_ext.LayerNormLSTM(5, 6, 2, True, False, 0.0, True, 3)  # nn.LSTM's positional order
    torch_layer = torch.nn.LSTM(5, 6, 2, True, False, 0.0, True, 3)
    ours = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    for name, p in torch_layer.named_parameters():
        if name.startswith("weight_"):
            assert ours[name] == tuple(p.shape), name
    assert layer.proj_size == 3 and "proj_size=3" in repr(layer)
    for bad, match in ((6, "proj_size must be smaller than hidden_size"), (-1, "non-negative integer"),
                       (1.5, "non-negative integer")):
        with pytest.raises(ValueError, match=match):
            ln_ext.LayerNormLSTM(5, 6, proj_size=bad)
    with pytest.raises(ValueError, match=r"h_0 must have shape \[1, 2, 3\] .*proj_size"):
        ln_ext.LayerNormLSTM(5, 6, proj_size=3)(torch.randn(4, 2, 5), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6)))


def test_projected_lstm_packed_per_step_and_inference():
    module = make("LSTM", num_layers=2, bidirectional=True, proj_size=3)
    lengths = [5, 3, 1]
    x, hx = sample("LSTM", module, T=5, B=3)
    out, (h_n, c_n) = module(pack_padded_sequence(x, torch.tensor(lengths)), hx)
    padded, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths):
        h_b = tuple(h[:, b: b + 1].contiguous() for h in hx)
        out_b, (hn_b, cn_b) = module(x[:n, b: b + 1], h_b)
        torch.testing.assert_close(padded[:n, b: b + 1], out_b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h_n[:, b: b + 1], hn_b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(c_n[:, b: b + 1], cn_b, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        inferred, (h_i, c_i) = module(x, hx)
    trained, (h_t, c_t) = module(x, hx)
    assert torch.equal(inferred, trained) and torch.equal(h_i, h_t) and torch.equal(c_i, c_t)
    # The sequence op against per-step autograd of the cell op and a projection GEMM.
    fwd = torch.ops.ln_ext.lstm_sequence_fwd
    for lengths in (None, [4, 2, 2]):
        for reverse in (False, True):
            args = sequence_op_inputs("LSTM", lengths=lengths)
            args[-2] = reverse
            H = args[3].shape[1]
            g = torch.Generator().manual_seed(4)
            P = 2
            w_hr = (0.5 * torch.randn(P, H, generator=g, dtype=torch.float64)).requires_grad_()
            args[1] = args[1][:, :P].contiguous()  # weight_hh [4H, P]
            args[2] = args[2][:, :P].contiguous()  # h0 [B, P]
            tensors = [t.requires_grad_() for t in args[:-3]]
            got = fwd(*args, True, w_hr)[:3]
            sizes = None if lengths is None else args[-3].tolist()
            want = ln_ext.rnn_ops.sequence_by_steps("LSTM", tensors[:1], tensors[1], tensors[2:4], tensors[4:], 1e-5,
                                                    reverse, sizes, weight_hr=w_hr)
            assert_same_outputs_and_grads(got, want, [*tensors, w_hr])
            torch.library.opcheck(fwd, (*args, True, w_hr))
            torch.library.opcheck(fwd, (*[t.detach() if isinstance(t, torch.Tensor) else t for t in args],
                                        False, w_hr.detach()))


def test_projected_lstm_double_backward_compile_and_export():
    module = make("LSTM", input_size=2, hidden_size=3, proj_size=2)
    x, hx = sample("LSTM", module, T=2, B=2)

    def f(x, weight_hr, h0, c0):
        out, (h_n, c_n) = torch.func.functional_call(module, {"weight_hr_l0": weight_hr}, (x, (h0, c0)), strict=False)
        return out, h_n, c_n

    assert torch.autograd.gradgradcheck(f, [x.clone().requires_grad_(), module.weight_hr_l0.detach().requires_grad_(),
                                            *(h.clone().requires_grad_() for h in hx)])
    torch._dynamo.reset()
    model = make("LSTM", dtype=torch.float32, num_layers=2, bidirectional=True, proj_size=3)
    xs = torch.randn(6, 2, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xc, xe = xs.clone().requires_grad_(), xs.clone().requires_grad_()
    out_c, out_e = compiled(xc)[0], model(xe)[0]
    torch.testing.assert_close(out_c, out_e)
    out_c.sum().backward()
    out_e.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    ep = torch.export.export(model, (xs,))
    torch.testing.assert_close(ep.module()(xs)[0], model(xs)[0])


# ---------------------------------------------------------------- PyTorch's own samples

def _module_db_samples():
    """(nn class name, constructor kwargs, forward args) of PyTorch's ModuleInfo samples for
    nn.RNN, nn.LSTM and nn.GRU (float64)."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    out = []
    for info in common_modules.module_db:
        if info.module_cls in (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU):
            for sample in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                                  training=True):
                out.append((info.module_cls.__name__, sample.constructor_input, sample.forward_input))
    return out


def test_pytorch_module_info_samples_match_reference():
    """Every ModuleInfo sample of nn.RNN/LSTM/GRU (nonlinearity, proj_size, bias,
    batch_first, bidirectional, unbatched input, with and without hx) builds the LN layer
    with the same arguments, and its outputs, final states and gradients match the float64
    reference of the equations."""
    samples = _module_db_samples()
    assert len(samples) >= 80, len(samples)
    for name, ctor, fwd in samples:
        mode = name
        module = randomize(LAYER[mode](*ctor.args, **ctor.kwargs, dtype=torch.float64))
        x = fwd.args[0]
        hx = fwd.args[1] if len(fwd.args) > 1 else None
        got, got_hn = module(*fwd.args)  # as the sample calls it (unbatched here)
        unbatched = x.dim() == 2
        xb = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if module.batch_first else x)
        if hx is None:
            hxb = tuple(torch.zeros_like(h) for h in states_tuple(mode, got_hn))
        else:
            hxb = states_tuple(mode, hx)
        hxb = tuple(h.unsqueeze(1) if unbatched else h for h in hxb)
        if unbatched:
            module.batch_first = False  # the batched run below is time-major
        assert_matches_reference(mode, module, xb, hxb, torch.float64)
        want, _ = reference.ln_rnn_layers(mode, xb, hxb, ref_params(module), module.eps,
                                          getattr(module, "nonlinearity", "tanh"))
        want = want.squeeze(1) if unbatched else (want.transpose(0, 1) if module.batch_first else want)
        torch.testing.assert_close(got, want.detach(), msg=lambda m: f"{name} {ctor.kwargs}: {m}")


# ---------------------------------------------------------------- export and compile of whole models

class _Holder(torch.nn.Module):
    """A model holding an LN-RNN (2 layers) and a linear head on its output."""

    def __init__(self, mode, bidirectional):
        super().__init__()
        self.rnn = make(mode, dtype=torch.float32, input_size=5, hidden_size=6, num_layers=2,
                        bidirectional=bidirectional)
        self.head = torch.nn.Linear(12 if bidirectional else 6, 3)

    def forward(self, x):
        out, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(out), h_n


def _sequence_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "sequence" in str(n.target)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_exports_and_runs(mode, bidirectional):
    """torch.export of a model holding the layer: one sequence op per layer-direction in
    the graph (not T steps), and the exported program gives eager's outputs."""
    model = _Holder(mode, bidirectional)
    x = torch.randn(7, 3, 5)
    ep = torch.export.export(model, (x,))
    assert len(_sequence_nodes(ep.graph)) == 2 * (2 if bidirectional else 1)
    x2 = torch.randn(7, 3, 5)
    for a, b in zip(ep.module()(x2), model(x2)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_compiles_fullgraph_and_matches_eager(mode, bidirectional):
    """torch.compile(fullgraph=True): no graph break, outputs and gradients as eager."""
    torch._dynamo.reset()
    model = _Holder(mode, bidirectional)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 2, 5)
    results = []
    for run in (compiled, model):
        model.zero_grad()
        xr = x.clone().requires_grad_()
        out, h_n = run(xr)
        (out.square().sum() + h_n.sum()).backward()
        results.append((out.detach(), h_n.detach(), xr.grad, *(p.grad for p in model.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- CUDA

# ---------------------------------------------------------------- CPU cell kernels

def float32_sweep():
    """float32 inputs over the whole range a gate meets: a dense grid where sigmoid and
    tanh bend, both signs of magnitudes from subnormal to FLT_MAX, a few ulps around
    the cut-over points of csrc/cpu/cell_math.h, and +-0, +-inf, NaN."""
    f32 = torch.finfo(torch.float32)
    dense = torch.linspace(-40, 40, 160001, dtype=torch.float64)
    mags = torch.logspace(-45, 38.5, 6000, dtype=torch.float64)
    edges = torch.tensor([0.55, 44.36, 87.33, 88.72, 89.0, 103.28, 104.0], dtype=torch.float64)
    x = torch.cat([dense, mags, -mags, edges, -edges]).float()
    near = [x.new_tensor([e]) for e in edges.tolist()]
    for k in range(4):  # neighbours, a few ulps out on each side
        near = [torch.nextafter(near[0], x.new_tensor(float("inf")))] + near + [
            torch.nextafter(near[-1], x.new_tensor(float("-inf")))]
    specials = x.new_tensor([0.0, -0.0, f32.max, -f32.max, f32.tiny, f32.smallest_normal / 8,
                             float("inf"), float("-inf"), float("nan")])
    x = torch.cat([x, *near, specials])
    return torch.cat([x, -x])


def ulps(got, want):
    """|got - want| in float32 ulps of want (float64), 0 where both are NaN."""
    w = want.float().abs()
    ulp = (torch.nextafter(w, w.new_tensor(float("inf"))) - w).double().clamp_min(2.0 ** -149)
    err = (got.double() - want).abs() / ulp
    both_nan = got.isnan() & want.isnan()
    return torch.where(both_nan, torch.zeros_like(err), err.nan_to_num(nan=float("inf")))


def cell_math_through_ops(x):
    """(name, got, want) for every gate nonlinearity of the CPU cell ops, on inputs x
    (float32): zero gains and shifts make each pre-activation x itself."""
    H = x.numel()
    g = torch.Generator().manual_seed(11)
    noise = lambda n: torch.randn(1, n, generator=g)  # noqa: E731  finite LN inputs
    zeros, ones = torch.zeros, torch.ones
    x64 = x.double()
    sig, tanh = torch.sigmoid(x64), torch.tanh(x64)
    out = []
    h, _ = torch.ops.ln_ext.rnn_cell_fwd(noise(H), noise(H), zeros(H), x, 1e-5)
    out.append(("RNN tanh", h[0], tanh))
    xg = x.repeat(4)[None]
    _, _, gates, _ = torch.ops.ln_ext.lstm_cell_fwd(xg, noise(4 * H), zeros(1, H), zeros(4 * H),
                                                    zeros(4 * H), ones(H), zeros(H), 1e-5)
    out += [("LSTM sigmoid", gates[0, :H], sig), ("LSTM tanh", gates[0, 2 * H: 3 * H], tanh)]
    _, gates, _ = torch.ops.ln_ext.gru_cell_fwd(x.repeat(2)[None], x[None], noise(3 * H), zeros(1, H),
                                                zeros(3 * H), zeros(3 * H), 1e-5)
    out += [("GRU sigmoid", gates[0, :H], sig), ("GRU tanh", gates[0, 2 * H: 3 * H], tanh)]
    return out


def test_cpu_cell_math_matches_float64():
    """The CPU cells' float32 sigmoid and tanh (csrc/cpu/cell_math.h: branch-free, so that
    the column loops vectorize) within 3 ulps of float64 everywhere (measured over every
    float32: sigmoid 2.4, tanh 1.6), exactly 0 / +-1 at the infinities, NaN for NaN."""
    x = float32_sweep()
    for name, got, want in cell_math_through_ops(x):
        err = ulps(got, want)
        worst = int(err.argmax())
        assert err.max() <= 3, f"{name}: {err.max():.2f} ulps at x={x[worst].item()!r}"
        assert torch.equal(got.isnan(), x.isnan()), name
        inf = x.isinf()
        assert torch.equal(got[inf].double(), want[inf]), name


@pytest.mark.parametrize("mode", MODES)
def test_cpu_saturated_cells_match_float64(mode):
    """Pre-activations far into saturation (|x| up to ~1e3): outputs and gradients of the
    float32 cell ops stay finite and match the float64 ones on the same inputs."""
    ins = cell_op_inputs(mode, B=5, H=37, requires_grad=False)
    with torch.no_grad():
        for t in ins:
            t.mul_(60.0)
    ins32 = [t.float().requires_grad_() for t in ins]
    ins64 = [t.double().requires_grad_() for t in ins32]
    g = torch.Generator().manual_seed(4)
    (fa, fr), (ga, gr) = TOL[torch.float32]
    results = []
    for args in (ins32, ins64):
        outs = cell_op(mode)(*args)
        dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, args, dys)
        results.append((outs, grads))
        g.manual_seed(4)
    (outs32, grads32), (outs64, grads64) = results
    for a, b in zip(outs32, outs64):
        assert a.isfinite().all()
        torch.testing.assert_close(a.double(), b.detach(), atol=fa, rtol=fr)
    for a, b in zip(grads32, grads64):
        assert a.isfinite().all()
        torch.testing.assert_close(a.double(), b, atol=ga * max(1.0, b.abs().max().item()), rtol=gr)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_cell_ops_independent_of_thread_count(mode, dtype, num_threads):
    """Each batch row is computed whole by one thread, in a fixed order: 1 and 2
    threads give the same bits, forward and backward."""
    results = []
    for n in (1, 2):
        num_threads(n)
        ins = cell_op_inputs(mode, B=16, H=96, dtype=dtype)
        outs = cell_op(mode)(*ins)
        grads = torch.autograd.grad(outs, ins, [torch.ones_like(o) for o in outs])
        results.append((*outs, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["tensor", "packed"])
def test_cpu_fused_lstm_loop_matches_reference_on_any_thread_count(packed, num_threads):
    """The CPU's whole-sequence LSTM loop (float32: one thread team, its own step GEMM)
    on shapes that leave a partial GEMM panel (4H = 268) and a partial row tile (B = 19),
    forwards and in reverse, with steps large enough for a team of two: the float64
    reference's outputs and gradients, and the same bits on 1 and 2 threads."""
    results = []
    for n in (1, 2):
        num_threads(n)
        # Packed: one direction (the reverse one, whose batch grows, runs the generic loop).
        module = make("LSTM", dtype=torch.float32, hidden_size=67, input_size=9, bidirectional=not packed)
        x, hx = sample("LSTM", module, T=4, B=19)
        if packed:  # batches 19, 19, 12, 5: every step's state a view of the previous step's
            lengths = torch.tensor([4] * 5 + [3] * 7 + [2] * 7)
            x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
            out, (h, c) = module(x, hx)
            results.append((out.data, h, c))
            continue
        assert_matches_reference("LSTM", module, x, hx, torch.float32)
        results.append(run_and_grads("LSTM", module, x, hx))
    flat = [[t for part in r for t in (part if isinstance(part, (list, tuple)) else (part,))] for r in results]
    for a, b in zip(*flat):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_inference_call_matches_reference(mode):
    """An inference call (no_grad: nothing saved, and enough rows, 32 x 9, for the CPU's own
    float32 input projection) against the float64 reference, with H = 150 (two k blocks of
    the step GEMM, a partial panel) and bidirectional; and the training call's output."""
    module = make(mode, dtype=torch.float32, hidden_size=150, input_size=140, bidirectional=True)
    x, hx = sample(mode, module, T=32, B=9)
    with torch.no_grad():
        out, hn = module(x.float(), tuple(h.float() for h in hx) if mode == "LSTM" else hx[0].float())
    rout, rhn, _ = ref_run_and_grads(mode, module, x, hx)
    (fa, fr), _ = TOL[torch.float32]
    torch.testing.assert_close(out.double(), rout.detach(), atol=fa, rtol=fr)
    for a, b in zip(hn if mode == "LSTM" else (hn,), rhn):
        torch.testing.assert_close(a.double(), b.detach(), atol=fa, rtol=fr)
    trained, _, _ = run_and_grads(mode, module, x.float(), tuple(h.float() for h in hx))
    torch.testing.assert_close(out, trained.detach(), atol=fa, rtol=fr)


@pytest.mark.parametrize("shape", [(300, 9, 268), (517, 300, 40), (256, 1030, 64), (2, 256, 7, 33)], ids=str)
def test_input_projection_matches_float64_no_worse_than_linear(shape, num_threads):
    """ln_ext.input_projection (x @ weight^T; float32 on the CPU by the step GEMM's tiles from
    256 rows): float64 closeness, an error no larger than F.linear's (MKL) on the same input
    beyond a 1.25x margin, the same bits on 1 and 2 threads, and a non-contiguous x."""
    *lead, K, out_features = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*lead, K, generator=g) * 3 + 1).float()
    w = torch.randn(out_features, K, generator=g).float()
    want = x.double() @ w.double().t()
    results = []
    for n in (1, 2):
        num_threads(n)
        results.append(torch.ops.ln_ext.input_projection(x, w))
    assert torch.equal(results[0], results[1])
    got = results[1]
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    err = (got.double() - want).abs().max().item()
    err_linear = (torch.nn.functional.linear(x, w).double() - want).abs().max().item()
    assert err <= 1.25 * err_linear, (err, err_linear)
    strided = torch.ops.ln_ext.input_projection(x.transpose(-1, -2).contiguous().transpose(-1, -2), w)
    assert torch.equal(strided, got)


def test_input_projection_edges_and_autograd():
    op = torch.ops.ln_ext.input_projection
    w = torch.randn(12, 5)
    assert op(torch.randn(0, 5), w).shape == (0, 12)
    assert torch.equal(op(torch.randn(300, 0), torch.randn(12, 0)), torch.zeros(300, 12))
    x64 = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(op(x64, w.double()), x64 @ w.double().t())
    for args, match in [((torch.randn(3, 4), w), "in_features 5"), ((torch.randn(3, 5), w[0]), "weight must be 2-D"),
                        ((torch.randn(3, 5), w.double()), "Float but weight is Double"),
                        ((torch.ones(3, 5, dtype=torch.int64), w.long()), "floating-point"),
                        ((torch.randn(3, 5), w.to("meta")), "meta")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    # Its gradients: F.linear's (dx by the op itself, 300 rows), and twice differentiable.
    xd, wd = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(6, 5, dtype=torch.float64,
                                                                                    requires_grad=True)
    assert torch.autograd.gradcheck(op, (xd, wd)) and torch.autograd.gradgradcheck(op, (xd, wd))
    fwad = torch.autograd.forward_ad  # forward mode: at::linear's derivative
    tangent = torch.randn(300, 5)
    with fwad.dual_level():
        primal, jvp = fwad.unpack_dual(op(fwad.make_dual(torch.randn(300, 5), tangent), w))
    torch.testing.assert_close(jvp, tangent @ w.t())
    x = torch.randn(300, 5, requires_grad=True)
    wg = w.clone().requires_grad_()
    op(x, wg).square().sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.linear(xr, wr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(wg.grad, wr.grad)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_capped_cpu_cell_build_matches_reference(isa):
    """The float32 checks again with the CPU cell kernels capped at `isa`: the generic
    build, and on an AVX-512 CPU the AVX2 one (which the CPU would not pick)."""
    run_with_cpu_isa_cap([f"test_rnn.py::{name}" for name in (
        "test_cpu_cell_math_matches_float64", "test_cpu_saturated_cells_match_float64",
        "test_layers_match_reference_reduced_precision", "test_larger_hidden_float32",
        "test_cpu_cell_ops_independent_of_thread_count", "test_cpu_fused_lstm_loop_matches_reference_on_any_thread_count",
        "test_inference_call_matches_reference", "test_input_projection_matches_float64_no_worse_than_linear",
        "test_cpu_kernel_isas_follow_the_cap")], isa=isa)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_cpu_kernel_isas_follow_the_cap():
    """Which CPU build runs: the best this CPU has, never above LN_EXT_CPU_ISA's cap."""
    isas = ln_ext._C.cpu_kernel_isas()
    cap = os.environ.get("LN_EXT_CPU_ISA")
    flags = _cpu_flags()
    has_avx2 = {"avx2", "fma", "f16c"} <= flags and platform.machine() in ("x86_64", "AMD64")
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    if cap == "generic" or not has_avx2:
        assert isas == {"norm_rows": "generic", "rnn_cells": "generic"}
    else:
        best = "avx512" if has_avx512 and cap != "avx2" else "avx2"
        assert isas == {"norm_rows": best, "rnn_cells": best}


@cuda
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_layers_match_reference(mode, dtype):
    module = make(mode, dtype=dtype, device="cuda", num_layers=2, bidirectional=True,
                  hidden_size=96, input_size=20)
    x, hx = sample(mode, module, T=6, B=7, device="cuda")
    assert_matches_reference(mode, module, x, hx, dtype)


@cuda
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("H", [1, 31, 257, 1024])
def test_cuda_cell_ops_match_cpu(mode, H):
    """Every output of the fused forward and backward ops, CUDA vs the CPU kernels, float32."""
    fwd = getattr(torch.ops.ln_ext, FWD_OP[mode])
    ins_cpu = cell_op_inputs(mode, B=5, H=H, dtype=torch.float32, requires_grad=False)
    for a, b in zip(fwd(*ins_cpu, 1e-5), fwd(*[t.cuda() for t in ins_cpu], 1e-5)):
        torch.testing.assert_close(b.cpu(), a, atol=2e-5, rtol=2e-5)
    name, args = bwd_op_sample(mode, B=5, H=H, dtype=torch.float32)
    bwd = getattr(torch.ops.ln_ext, name)
    for a, b in zip(bwd(*args), bwd(*[t.cuda() for t in args])):
        torch.testing.assert_close(b.cpu(), a, atol=5e-5, rtol=5e-5)


@cuda
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_opcheck_and_reproducible_grads(mode):
    op = getattr(torch.ops.ln_ext, FWD_OP[mode])
    torch.library.opcheck(op, (*cell_op_inputs(mode, device="cuda"), 1e-5))
    module = make(mode, dtype=torch.float32, device="cuda", hidden_size=128)
    x, hx = sample(mode, module, T=4, B=9, device="cuda")
    _, _, g1 = run_and_grads(mode, module, x, hx)
    _, _, g2 = run_and_grads(mode, module, x, hx)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_autocast_runs_in_bfloat16_like_torch_nn(mode):
    """Under autocast the layer computes in the autocast dtype, from float32
    parameters and input, and the parameters' gradients come back as float32."""
    module = make(mode, dtype=torch.float32, num_layers=2)
    x, hx = sample(mode, module, T=4, B=3)
    hx = hx if mode == "LSTM" else hx[0]
    want, _ = module(x, hx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hn = module(x, hx)
    assert out.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in states_tuple(mode, hn))
    torch.testing.assert_close(out.float(), want, atol=6e-2, rtol=6e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
    cell = randomize(CELL[mode](5, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = states_tuple(mode, cell(x[0]))
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), states_tuple(mode, cell(x[0]))[0], atol=6e-2, rtol=6e-2)
