"""CUDA graphs: ln_ext's ops captured (torch.cuda.graph, torch.compile mode="reduce-overhead")
and replayed on new inputs give what eager gives. GPU only; skipped elsewhere.

A capture fails if anything in it synchronizes with the host or allocates outside the
caching allocator (torch.cuda.graph captures in the "global" error mode), so these
tests also check that no launch path does either. The first test runs in a fresh
process so that every kernel's first launch, with its one-time attribute and
occupancy queries, happens inside the capture.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ln_ext
from samples import HAS_CUDA

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and ln_ext's CUDA kernels")]

TOL = dict(atol=1e-5, rtol=1e-5)  # float32; the same kernels run, but cuBLAS may pick other algorithms in a capture


class Block(nn.Module):
    """A pre-norm MLP block: two norms (one without bias) around two linears."""

    def __init__(self, d=256):
        super().__init__()
        self.norm1, self.fc1 = nn.LayerNorm(d), nn.Linear(d, 4 * d)
        self.norm2, self.fc2 = nn.LayerNorm(4 * d, bias=False), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(self.norm2(torch.relu(self.fc1(self.norm1(x)))))


def _models(make):
    torch.manual_seed(0)
    ref = make().cuda()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.5)
    return ref, ln_ext.convert_layer_norm(copy.deepcopy(ref))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _eager_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().square().mean().backward()
    return out.detach().clone(), _grads(model)


def _assert_same(got, want, what):
    out, grads = got
    out_w, grads_w = want
    assert torch.isfinite(out).all(), what
    torch.testing.assert_close(out, out_w, **TOL, msg=lambda m: f"{what} output: {m}")
    for i, (g, w) in enumerate(zip(grads, grads_w)):
        torch.testing.assert_close(g, w, atol=TOL["atol"] * float(w.abs().max()), rtol=TOL["rtol"],
                                   msg=lambda m: f"{what} grad {i}: {m}")


def _capture(model, static_x):
    """torch.cuda.graph of forward + backward, after the warm-up on a side stream that
    the PyTorch docs prescribe (cuBLAS and autograd set up lazily)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _eager_step(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.float().square().mean().backward()
    return graph, static_out


class _Recurrent(nn.Module):
    """An LN-RNN layer (2 layers, bidirectional) and a LayerNorm head on its output."""

    def __init__(self, cls, d=64):
        super().__init__()
        self.rnn = cls(d, d, num_layers=2, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * d)

    def forward(self, x):
        return self.norm(self.rnn(x)[0])


MODELS = {
    "block": (Block, (32, 64, 256)),
    "LayerNormLSTM": (lambda: _Recurrent(ln_ext.LayerNormLSTM), (4, 12, 64)),
    "LayerNormGRU": (lambda: _Recurrent(ln_ext.LayerNormGRU), (4, 12, 64)),
    "LayerNormRNN": (lambda: _Recurrent(ln_ext.LayerNormRNN), (4, 12, 64)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_graph_forward_backward(name):
    """Captured forward + backward, replayed on three new inputs: the output and every
    parameter gradient as in eager ln_ext and in eager nn.LayerNorm."""
    make, shape = MODELS[name]
    ref, model = _models(make)
    static_x = torch.randn(shape, device="cuda")
    graph, static_out = _capture(model, static_x)
    eager = copy.deepcopy(model)
    for i in range(3):
        x = torch.randn(shape, device="cuda") * (1 + i) + 0.5
        static_x.copy_(x)
        graph.replay()
        got = (static_out.detach().clone(), _grads(model))
        _assert_same(got, _eager_step(eager, x), f"{name} replay {i} vs eager ln_ext")
        _assert_same(got, _eager_step(ref, x), f"{name} replay {i} vs eager nn.LayerNorm")


class _PackedLayer(nn.Module):
    """One bidirectional LN-RNN layer on a packed batch (sequences end at different
    steps: the sequence ops' batch_sizes path), output and final state both used."""

    LENGTHS = torch.tensor([6, 4, 4, 1])

    def __init__(self, cls, d=32):
        super().__init__()
        self.rnn = cls(d, d, bidirectional=True)

    def forward(self, x):
        out, state = self.rnn(nn.utils.rnn.pack_padded_sequence(x, self.LENGTHS))
        h_n = state[0] if isinstance(state, tuple) else state
        return torch.cat([out.data, h_n.flatten(0, 1)])


@pytest.mark.parametrize("cls", [ln_ext.LayerNormLSTM, ln_ext.LayerNormGRU, ln_ext.LayerNormRNN],
                         ids=lambda c: c.__name__)
def test_cuda_graph_one_layer_packed(cls):
    """A layer's forward + backward (one sequence op each way per direction, no host
    sync and no allocation inside the time loop) captured and replayed on new inputs
    against eager."""
    torch.manual_seed(0)
    model = _PackedLayer(cls).cuda()
    shape = (6, 4, 32)
    static_x = torch.randn(shape, device="cuda")
    graph, static_out = _capture(model, static_x)
    eager = copy.deepcopy(model)
    for i in range(3):
        x = torch.randn(shape, device="cuda") * (1 + i) - 0.25
        static_x.copy_(x)
        graph.replay()
        got = (static_out.detach().clone(), _grads(model))
        _assert_same(got, _eager_step(eager, x), f"{cls.__name__} replay {i} vs eager")


def test_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") runs forward and backward as CUDA graphs (no
    cudagraph skip is counted) and matches eager on new inputs every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, model = _models(Block)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for i in range(5):  # the first calls record, the later ones replay
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(32, 64, 256, device="cuda") * (1 + i) - 0.5
        _assert_same(_eager_step(compiled, x), _eager_step(ref, x), f"step {i}")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


# Shapes that take each LayerNorm kernel shape on an sm_90 GPU: several rows per warp,
# a warp per row, a block per row, a long row in shared memory, and thread-block clusters.
FIRST_LAUNCH_SHAPES = [(4099, 7), (300, 1025), (37, 5127), (9, 32768 + 3), (2, 262144 + 5)]


def test_first_launch_inside_capture():
    """In a fresh process, each shape's forward and backward (dx, dweight, dbias) run for the
    first time inside a capture, in float32 and bfloat16, then replay on new data."""
    code = textwrap.dedent(f"""
        import torch, ln_ext
        ops = torch.ops.ln_ext
        for dtype in (torch.float32, torch.bfloat16):
            for M, N in {FIRST_LAUNCH_SHAPES!r}:
                x = torch.randn(M, N, device="cuda", dtype=dtype)
                dy = torch.randn_like(x)
                w = torch.randn(N, device="cuda", dtype=dtype)
                b = torch.randn(N, device="cuda", dtype=dtype)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y, mean, rstd = ops.layer_norm_fwd(x, [N], w, b, 1e-5)
                    dx, dw, db = ops.layer_norm_bwd(dy, x, mean, rstd, w, b, [True, True, True])
                x.copy_(torch.randn_like(x) * 3 + 1)
                dy.copy_(torch.randn_like(dy))
                graph.replay()
                want = ops.layer_norm_fwd(x, [N], w, b, 1e-5)
                want = (*want, *ops.layer_norm_bwd(dy, x, want[1], want[2], w, b, [True, True, True]))
                for name, got, ref in zip("y mean rstd dx dw db".split(), (y, mean, rstd, dx, dw, db), want):
                    assert torch.equal(got, ref), (dtype, M, N, name)
        print("ok")
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout[-2000:] + done.stderr[-4000:]
