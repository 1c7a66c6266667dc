"""Tensors of one op call on different devices get an error naming the argument, in the
real kernels and in the fake (meta) kernels, eagerly and under torch.compile; a call
with every tensor on the meta device works and gives the real call's shapes.

The dispatcher runs a call on the kernel of its highest-priority device, so a meta
weight beside a CPU input lands in the fake kernel: without its own device check that
returned uninitialized CPU memory. A model built under torch.device("meta") and only
partly materialized is how users meet this.
"""
import pytest
import torch
from torch import nn

import ln_ext
from samples import CUDA_ONLY, make_sample
from test_rnn import FWD_OP, MODES, SEQ_OP, bwd_op_sample, cell_op_inputs, sequence_bwd_sample, sequence_op_inputs

# Argument names as the error messages spell them (the schema's where not listed).
MESSAGE_NAME = {"x": "input", "dy": "grad_output"}


def _norm_calls(device):
    ops = torch.ops.ln_ext
    s = make_sample("devices", (5, 12), device=device)
    residual = torch.randn_like(s.x)
    _, mean, rstd = ops.layer_norm_fwd(*s.op_args())
    yield ops.layer_norm_fwd.default, list(s.op_args()), "input"
    yield ops.layer_norm_bwd.default, [s.dy, s.x, mean, rstd, s.weight, s.bias, [True, True, True], residual], "input"
    _, rms_rstd = ops.rms_norm_fwd(s.x, [12], s.weight, 1e-5)
    yield ops.rms_norm_fwd.default, [s.x, [12], s.weight, 1e-5], "input"
    yield ops.rms_norm_bwd.default, [s.dy, s.x, rms_rstd, s.weight, [True, True], residual], "input"
    yield ops.add_layer_norm_fwd.default, [s.x, residual, [12], s.weight, s.bias, 1e-5], "input"
    yield ops.add_rms_norm_fwd.default, [s.x, residual, [12], s.weight, 1e-5], "input"


def _channels_first_calls(device):
    ops = torch.ops.ln_ext
    x, dy = torch.randn(2, 6, 3, 4, device=device), torch.randn(2, 6, 3, 4, device=device)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    _, mean, rstd = ops.channels_first_layer_norm_fwd(x, w, b, 1e-6)
    _, rms_rstd = ops.channels_first_rms_norm_fwd(x, w, 1e-6)
    yield ops.channels_first_layer_norm_fwd.default, [x, w, b, 1e-6], "input"
    yield ops.channels_first_layer_norm_bwd.default, [dy, x, mean, rstd, w, b, [True, True, True]], "input"
    yield ops.channels_first_rms_norm_fwd.default, [x, w, 1e-6], "input"
    yield ops.channels_first_rms_norm_bwd.default, [dy, x, rms_rstd, w, [True, True]], "input"


def _cell_calls(device):
    for mode in MODES:
        yield getattr(torch.ops.ln_ext, FWD_OP[mode]).default, [*cell_op_inputs(mode, device=device, requires_grad=False), 1e-5], "hproj"
        name, args = bwd_op_sample(mode, device=device)
        yield getattr(torch.ops.ln_ext, name).default, list(args), "hproj"


def _sequence_calls(device):
    """Unpacked (batch_sizes None: it lives on the CPU whatever the other tensors' device)."""
    for mode in MODES:
        yield getattr(torch.ops.ln_ext, SEQ_OP[mode] + "_fwd").default, sequence_op_inputs(mode, device=device), "weight_hh"
        name, args = sequence_bwd_sample(mode, device=device)
        yield getattr(torch.ops.ln_ext, name).default, args, "weight_hh"


def _projection_calls(device):
    x, w = torch.randn(2, 150, 6, device=device), torch.randn(12, 6, device=device)  # 300 rows: the CPU GEMM
    yield torch.ops.ln_ext.input_projection.default, [x, w], "input"


def every_call(device="cpu"):
    """(op, arguments, name of the argument the others must match) for every ln_ext op."""
    yield from _norm_calls(device)
    yield from _channels_first_calls(device)
    yield from _cell_calls(device)
    yield from _sequence_calls(device)
    yield from _projection_calls(device)


def _tensor_args(op, args):
    names = [a.name for a in op._schema.arguments]
    return [(i, names[i]) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _replace(args, i, value):
    return [value if j == i else a for j, a in enumerate(args)]


def test_every_op_is_covered():
    """A new op must be added to every_call (and so to these tests)."""
    covered = {op._schema.name for op, _, _ in every_call()}
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("ln_ext::")}
    assert registered <= covered, f"not covered: {sorted(registered - covered)}"


def test_meta_argument_beside_cpu_tensors_is_an_error():
    """Each tensor argument in turn on the meta device, the others on the CPU."""
    for op, args, ref in every_call():
        for i, name in _tensor_args(op, args):
            bad = _replace(args, i, args[i].to("meta"))
            shown = MESSAGE_NAME.get(name, name)
            # The meta tensor is named, or (when it is the reference) a CPU tensor beside it.
            pattern = (rf"{shown} is on meta but {ref} is on cpu" if shown != ref
                       else rf"is on cpu but {ref} is on meta")
            with pytest.raises(RuntimeError, match=pattern):
                op(*bad)


def test_every_tensor_on_meta_gives_the_real_shapes():
    for op, args, _ in every_call():
        real = op(*args)
        meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        for r, m in zip(real, meta):
            assert m.device.type == "meta" and m.shape == r.shape and m.dtype == r.dtype, op


def test_meta_argument_is_an_error_under_compile():
    """The fake kernels check devices while torch.compile traces (one argument per op)."""
    for op, args, ref in every_call():
        i, name = next((i, n) for i, n in _tensor_args(op, args) if MESSAGE_NAME.get(n, n) != ref)
        bad = _replace(args, i, args[i].to("meta"))
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a, op=op: op(*a), fullgraph=True, backend="eager")
        with pytest.raises(RuntimeError, match=rf"{MESSAGE_NAME.get(name, name)} is on meta but {ref} is on cpu"):
            compiled(*bad)


def test_partly_materialized_model_names_the_parameter():
    """A model built on the meta device whose LayerNorm was left there: a clear error, for
    ln_ext.layer_norm, ln_ext.LayerNorm and a converted nn.LayerNorm alike."""
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        ln_ext.layer_norm(x, (8,), torch.ones(8, device="meta"))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    model[0].to_empty(device="cpu")  # only the Linear materialized
    model = ln_ext.convert_layer_norm(model)
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        model(x)
    x.requires_grad_(True)  # through the autograd kernel too
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        model[1](x)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cpu_and_cuda_tensors_mixed_is_an_error(device):
    """Each tensor argument in turn on the CPU beside CUDA tensors, and on CUDA beside CPU ones."""
    for op, args, ref in every_call(device):
        for i, name in _tensor_args(op, args):
            shown = MESSAGE_NAME.get(name, name)
            if shown == ref:
                continue
            with pytest.raises(RuntimeError, match=rf"{shown} is on cpu but {ref} is on cuda"):
                op(*_replace(args, i, args[i].cpu()))
            cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError, match=rf"{shown} is on cuda:0 but {ref} is on cpu"):
                op(*_replace(cpu_args, i, args[i]))
