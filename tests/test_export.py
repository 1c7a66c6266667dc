"""Deployment paths of a model holding ln_ext.LayerNorm: torch.export (dynamic batch),
export save/load, AOTInductor packages (Python and C++ loaders), torch.compile(dynamic=True).

These need nothing but the fake kernels and the library being loaded: every norm stays
one ln_ext.layer_norm_fwd node, which the loaders resolve by name.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from torch import nn

import ln_ext

TOL = dict(atol=1e-5, rtol=1e-5)  # float32: compiled code orders GELU / GEMM rounding differently
LIB = ln_ext._C.__file__


class Net(nn.Module):
    """[batch, seq, 24] -> [batch, seq, 8], a norm with and one without bias."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(24, 48), nn.LayerNorm(48)
        self.fc2, self.norm2 = nn.Linear(48, 8), nn.LayerNorm(8, bias=False)

    def forward(self, x):
        return self.norm2(self.fc2(nn.functional.gelu(self.norm1(self.fc1(x)))))


def inputs(batch):
    return torch.randn(batch, 5, 24) * 2 + 0.5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        for m in (net.norm1, net.norm2):
            m.weight.normal_(1.0, 0.5)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    return ln_ext.convert_layer_norm(net).eval()


@pytest.fixture(scope="module")
def exported(model):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (inputs(3),), dynamic_shapes=({0: batch},))


def layer_norm_nodes(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "layer_norm" in str(n.target)]


def test_export_keeps_one_node_per_norm(model, exported):
    """Each norm is one ln_ext.layer_norm_fwd node, in the exported (training) IR and after
    decomposition to the inference IR, and the batch dim stays symbolic."""
    for ep in (exported, exported.run_decompositions()):
        assert layer_norm_nodes(ep) == ["ln_ext.layer_norm_fwd.default"] * 2
        for batch in (1, 2, 7):  # not the traced batch of 3
            x = inputs(batch)
            assert torch.equal(ep.module()(x), model(x))
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert isinstance(placeholder.meta["val"].shape[0], torch.SymInt)


def test_export_save_load_roundtrip(model, exported, tmp_path):
    path = tmp_path / "net.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    assert layer_norm_nodes(loaded) == ["ln_ext.layer_norm_fwd.default"] * 2
    x = inputs(4)
    assert torch.equal(loaded.module()(x), model(x))


@pytest.fixture(scope="module")
def aoti_package(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "net_aoti.pt2"
    return torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def test_aoti_package_matches_eager(model, aoti_package):
    runner = torch._inductor.aoti_load_package(aoti_package)
    for batch in (1, 6):
        x = inputs(batch)
        got, want = runner(x), model(x)
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL)


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_loading_without_ln_ext_fails_clearly(aoti_package, exported, model, tmp_path):
    """A process that has not imported ln_ext cannot run its ops: both loaders name the
    missing op. After `import ln_ext` the same process loads both files."""
    ep_path = tmp_path / "net.pt2"
    torch.export.save(exported, ep_path)
    x = inputs(2)
    torch.save(x, tmp_path / "x.pt")
    done = _python(f"""
        import torch
        for name, load in (("aoti", lambda: torch._inductor.aoti_load_package({str(aoti_package)!r})),
                           ("export", lambda: torch.export.load({str(ep_path)!r}))):
            try:
                load()
                print(name, "loaded without ln_ext")
            except Exception as e:
                print(name, "failed:", type(e).__name__, e)
        import ln_ext
        x = torch.load({str(tmp_path / 'x.pt')!r})
        torch.save((torch._inductor.aoti_load_package({str(aoti_package)!r})(x),
                    torch.export.load({str(ep_path)!r}).module()(x)), {str(tmp_path / 'y.pt')!r})
        """)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[0].startswith("aoti failed:") and "ln_ext::layer_norm_fwd" in out[0], out  # "Could not find schema for"
    assert out[1].startswith("export failed: RuntimeError"), out
    # torch.export.load logs the cause before raising: it names the op and says to import it.
    assert "failed to resolve torch.ops.ln_ext.layer_norm_fwd.default" in done.stderr
    assert "Please import the custom op" in done.stderr
    aoti_y, export_y = torch.load(tmp_path / "y.pt")
    # Another process: its GEMMs may split the work over other threads, so not bitwise.
    torch.testing.assert_close(aoti_y, model(x), **TOL)
    torch.testing.assert_close(export_y, model(x), **TOL)


CPP_MAIN = r"""
// A C++ deployment of an AOTInductor package that uses ln_ext's ops (README).
#include <dlfcn.h>
#include <fstream>
#include <iostream>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {  // argv: package, input tensor file, ln_ext library or "-"
  if (std::string(argv[3]) != "-" && !dlopen(argv[3], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "dlopen: " << dlerror() << "\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::ifstream file(argv[2], std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    std::vector<torch::Tensor> in = {torch::pickle_load(bytes).toTensor()};
    torch::Tensor out = loader.run(in)[0];
    std::vector<char> saved = torch::pickle_save(out);
    std::ofstream(std::string(argv[2]) + ".out", std::ios::binary).write(saved.data(), saved.size());
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
"""


@pytest.mark.check
def test_cpp_deployment(aoti_package, model, tmp_path):
    """The README's C++ recipe: a program linked against libtorch (plus libtorch_python and
    libpython, which ln_ext's library, a Python extension module, needs) dlopens the
    library, then loads the package; without the library it gets the missing op's name."""
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not ldlib or not ldlib.endswith(".so") or not os.path.exists(os.path.join(libdir, ldlib)):
        pytest.skip("this Python has no shared libpython to link a C++ program against")
    torch_dir = os.path.dirname(torch.__file__)
    (tmp_path / "main.cpp").write_text(CPP_MAIN)
    cxx = os.environ.get("CXX", "c++")
    build = subprocess.run(
        [cxx, "-std=c++20", "-O0", "main.cpp", "-o", "main", f"-I{torch_dir}/include",
         f"-I{torch_dir}/include/torch/csrc/api/include", f"-L{torch_dir}/lib", f"-L{libdir}",
         f"-Wl,-rpath,{torch_dir}/lib", f"-Wl,-rpath,{libdir}", "-Wl,--no-as-needed",
         "-ltorch", "-ltorch_cpu", "-lc10", "-ltorch_python", f"-l{ldlib[3:-3]}", "-ldl",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    x = inputs(3)
    torch.save(x, tmp_path / "x.pt")  # torch::pickle_load reads torch.save's format
    run = subprocess.run(["./main", aoti_package, "x.pt", "-"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "ln_ext::layer_norm_fwd" in run.stderr, run.stderr
    run = subprocess.run(["./main", aoti_package, "x.pt", LIB], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "x.pt.out"), model(x), **TOL)


def test_compile_dynamic_one_graph(model):
    """torch.compile(dynamic=True): one graph for every batch size, forward and backward,
    with eager's outputs and gradients."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    train = ln_ext.convert_layer_norm(Net()).train()
    train.load_state_dict(model.state_dict())
    ref = Net().train()
    ref.load_state_dict(model.state_dict())
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(train, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for batch in (2, 3, 5, 8):
        x = inputs(batch)
        got, want = compiled(x), ref(x)
        frames.append(counter.frame_count)
        torch.testing.assert_close(got, want, **TOL)
        grads = torch.autograd.grad(got.square().sum(), list(train.parameters()))
        want_grads = torch.autograd.grad(want.square().sum(), list(ref.parameters()))
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-4 * float(w.abs().max()), rtol=1e-4)
    # Nothing recompiles after the first batch size, and one graph holds all the ops (dynamo
    # also records an empty graph for the module call's prologue, whatever the model).
    assert frames == frames[:1] * 4, frames
    graphs = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(graphs) == 1
    assert [str(n.target) for n in graphs[0].graph.nodes if "layer_norm" in str(n.target)] == ["ln_ext.layer_norm_fwd"] * 2
