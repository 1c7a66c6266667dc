"""transformers' own kernel route (`kernels.kernelize`, `from_pretrained(use_kernels=True)`)
picking ln_ext from its local repository (ln_ext/hub_kernel, ln_ext.hub): tiny models built from
configs, norm weights randomized; every decorated norm runs an ln_ext op, forward and backward,
and outputs and gradients equal the model's own. Nothing is downloaded: the tests run offline
with every socket connection refused.

transformers' decorators are no-ops unless it accepts the installed `kernels` version (5.23 wants
>= 0.18.2, < 0.19). Then the kernelize tests apply kernels' own `replace_kernel_forward_from_hub`
to the classes (the call the decorator makes), and the from_pretrained test is skipped.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import socket
import subprocess
import sys
import warnings

import pytest
import torch

import ln_ext
import ln_ext.hub
from ln_ext.hub_kernel import layers

kernels = pytest.importorskip("kernels")
transformers = pytest.importorskip("transformers")
from kernels import Mode, kernelize, use_kernel_mapping  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm  # noqa: E402
from transformers.utils.import_utils import is_kernels_available  # noqa: E402

TRANSFORMERS_TAKES_KERNELS = is_kernels_available()
# kernel_mapping's warning where transformers ignores the installed kernels (tested below)
pytestmark = pytest.mark.filterwarnings("ignore:transformers .* supports kernels:RuntimeWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (its constants are read at import, long
    before a test runs), and no socket may connect."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def decorated():
    """The classes carry their layer name as transformers' decorator gives it; where transformers
    ignores the installed kernels, kernels' own decorator call gives it, undone afterwards."""
    added = []
    for cls, name in ((LlamaRMSNorm, "RMSNorm"), (Olmo2RMSNorm, "RMSNorm"), (Qwen3_5RMSNorm, "RMSNormZeroCentered")):
        if getattr(cls, "kernel_layer_name", None) is None:
            kernels.replace_kernel_forward_from_hub(cls, name)
            added.append(cls)
        assert cls.kernel_layer_name == name
    yield
    for cls in added:
        del cls.kernel_layer_name, cls.kernel_condition


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# model type -> (model class, config, its decorated norm class, how many of them)
MODELS = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON), LlamaRMSNorm, 5),
    # a linear-attention layer (whose RMSNormGated keeps its own forward) and a full one (q/k norms)
    "qwen3_5": (Qwen3_5ForCausalLM, lambda: Qwen3_5TextConfig(
        **COMMON, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]), Qwen3_5RMSNorm, 7),
}


def tiny(model_type):
    model_cls, config, norm_cls, _ = MODELS[model_type]
    torch.manual_seed(0)
    model = model_cls(config())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norm_cls):
                m.weight.normal_()  # Qwen3.5's zero init would hide a missing 1 + w
    return model


def ln_ext_events(fn):
    """fn's result and how often each ln_ext op ran in it."""
    with torch.profiler.profile() as prof:
        out = fn()
    counts = {}
    for e in prof.events():
        if e.name.startswith("ln_ext::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return out, counts


def run(model, ids, backward):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    if backward:
        logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()} if backward else {}
    return logits.detach(), grads


def assert_same_run(kernelized, reference, ids, backward, num_norms):
    expected, expected_grads = run(reference, ids, backward)
    (got, got_grads), counts = ln_ext_events(lambda: run(kernelized, ids, backward))
    assert counts.get("ln_ext::rms_norm_fwd") == num_norms, counts
    if backward:
        assert counts.get("ln_ext::rms_norm_bwd") == num_norms, counts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def kernel_digest(folder):
    """The digest kernels (>= 0.18) checks: sha256, base64, of every file but metadata.json
    and bytecode."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != "metadata.json" and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[rel] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return files


def test_the_repository_is_a_kernel_kernels_loads():
    path = ln_ext.hub.kernel_repo_path()
    assert path.is_absolute() and (path / "metadata.json").is_file()
    metadata = json.loads((path / "metadata.json").read_text())
    digest = kernel_digest(path)
    assert metadata["digest"] == {"algorithm": "sha256", "files": digest}, (
        "ln_ext/hub_kernel changed: set metadata.json's digest to "
        + json.dumps({"algorithm": "sha256", "files": digest}, indent=2))
    assert metadata["python-depends"] == [] and not metadata.get("kernel-depends")  # nothing to fetch
    module = kernels.get_local_kernel(path)
    assert module.layers is layers
    assert all(getattr(layers, cls) for cls in ln_ext.hub.LAYERS.values())


def test_import_ln_ext_imports_neither_kernels_nor_transformers():
    code = ("import sys, ln_ext, ln_ext.hub, ln_ext.hub_kernel; "
            "assert not {'kernels', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_mapping_arguments():
    mapping = ln_ext.hub.kernel_mapping(device="cpu", modes=[Mode.INFERENCE])
    assert set(mapping) == {"RMSNorm", "RMSNormZeroCentered"}
    (repo,) = mapping["RMSNorm"]["cpu"].values()
    assert repo.layer_name == "RMSNorm" and list(mapping["RMSNorm"]["cpu"]) == [Mode.INFERENCE]
    default = ln_ext.hub.kernel_mapping()  # every mode: the repository itself, kernels' Mode.FALLBACK
    assert isinstance(default["RMSNorm"]["cpu"], kernels.LocalLayerRepository)
    assert set(default["RMSNorm"]) == ({"cpu", "cuda"} if ln_ext.has_cuda_kernels() else {"cpu"})
    with pytest.raises(ValueError, match="RMSNormGated"):
        ln_ext.hub.kernel_mapping(layers=["RMSNormGated"])


@pytest.mark.parametrize("model_type,mode", [("llama", Mode.TRAINING), ("llama", Mode.INFERENCE),
                                             ("qwen3_5", Mode.TRAINING)])
def test_kernelize_runs_ln_ext_in_every_norm(decorated, model_type, mode):
    _, _, norm_cls, num_norms = MODELS[model_type]
    reference = tiny(model_type)
    model = copy.deepcopy(reference)
    with use_kernel_mapping(ln_ext.hub.kernel_mapping(), inherit_mapping=False):
        model = kernelize(model, mode=mode, device="cpu")
    norms = [m for m in model.modules() if isinstance(m, norm_cls)]
    layer = layers.RMSNorm if model_type == "llama" else layers.RMSNormZeroCentered
    assert len(norms) == num_norms and all(m.forward.__func__ is layer.forward for m in norms)
    ids = torch.randint(0, 128, (2, 8))
    training = mode == Mode.TRAINING
    model.train(training)
    reference.train(training)
    with torch.set_grad_enabled(training):
        assert_same_run(model, reference, ids, backward=training, num_norms=num_norms)


def test_each_class_keeps_its_own_math(decorated):
    """OLMo 2's RMSNorm shares the name "RMSNorm" but casts after the weight multiply: it gets its
    own form (bf16 out beside an fp32 weight, where Llama's gives fp32); a subclass, whose math
    ln_ext cannot know, keeps its own forward."""
    class MyNorm(LlamaRMSNorm):
        pass

    model = torch.nn.ModuleDict({"llama": LlamaRMSNorm(64), "olmo2": Olmo2RMSNorm(64), "qwen3_5": Qwen3_5RMSNorm(64),
                                 "sub": MyNorm(64)})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    reference = copy.deepcopy(model)
    with use_kernel_mapping(ln_ext.hub.kernel_mapping(), inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert model["sub"].forward.__func__ is layers.RMSNorm.forward  # swapped, and falls back inside
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for name in model:
        got, counts = ln_ext_events(lambda: model[name](x))
        expected = reference[name](x)
        assert got.dtype == expected.dtype, name
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2, msg=name)
        assert bool(counts) == (name != "sub"), (name, counts)


def test_torch_compile_mode(decorated):
    model = tiny("llama").model.norm
    reference = copy.deepcopy(model)
    with use_kernel_mapping(ln_ext.hub.kernel_mapping(), inherit_mapping=False):
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cpu")
    assert model.forward.__func__ is layers.RMSNorm.forward
    x = torch.randn(4, 64, requires_grad=True)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    (dx,) = torch.autograd.grad(got.square().sum(), x)
    expected = reference(x)
    (expected_dx,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(dx, expected_dx)


@pytest.mark.skipif(not TRANSFORMERS_TAKES_KERNELS,
                    reason=f"transformers {transformers.__version__} does not accept kernels {kernels.__version__}")
@pytest.mark.parametrize("model_type", ["llama", "qwen3_5"])
def test_from_pretrained_use_kernels(tmp_path, model_type):
    model_cls, _, norm_cls, num_norms = MODELS[model_type]
    tiny(model_type).save_pretrained(tmp_path)
    reference = model_cls.from_pretrained(tmp_path)
    model = model_cls.from_pretrained(tmp_path, use_kernels=True, kernel_config=ln_ext.hub.kernel_config())
    norms = [m for m in model.modules() if isinstance(m, norm_cls)]
    layer = layers.RMSNorm if model_type == "llama" else layers.RMSNormZeroCentered
    assert len(norms) == num_norms and all(m.forward.__func__ is layer.forward for m in norms)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert_same_run(model, reference, ids, backward=False, num_norms=num_norms)
    # train() re-kernelizes for training: ln_ext stays, and runs backward.
    model.train()
    reference.train()
    assert all(m.forward.__func__ is layer.forward for m in norms)
    assert_same_run(model, reference, ids, backward=True, num_norms=num_norms)


def test_kernel_mapping_warns_when_transformers_ignores_kernels():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ln_ext.hub.kernel_mapping()
    ours = [w for w in caught if "kernelize leaves them alone" in str(w.message)]
    assert len(ours) == (0 if TRANSFORMERS_TAKES_KERNELS else 1)
