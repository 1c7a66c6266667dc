"""convert_layer_norm on the models people train: transformers' LLM families and timm.

Tiny models built from configs (nothing downloaded), norm weights randomized (Gemma's zero
init would hide a missing weight offset), eval mode (no dropout randomness). For each family:
  - fp32: the converted model's outputs and every parameter gradient equal the original's;
  - bf16: its error against a float64 run of the same model is at most 2x the original bf16
    model's, plus a floor;
  - every norm module was converted (strict=True) and runs an ln_ext op, not aten's math;
  - state_dict, save_pretrained -> from_pretrained into an unconverted model, deepcopy,
    generate() and torch.compile(fullgraph=True) keep working.
The table itself is checked against the installed transformers' source.
"""
from __future__ import annotations

import ast
import copy
import glob
import importlib
import io
import os

import pytest
import torch

import ln_ext
from ln_ext import convert

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
# model_type -> (extra config, the forms its norms must take)
CAUSAL_LM = {
    "llama": ({}, {"llama_rms"}),
    "mistral": ({}, {"llama_rms"}),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), {"llama_rms"}),
    "qwen2": ({}, {"llama_rms"}),
    "qwen3": ({}, {"llama_rms"}),  # q_norm / k_norm over the head dim too
    "phi3": ({}, {"llama_rms"}),
    "deepseek_v3": (dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32,
                         n_group=1, topk_group=1, num_key_value_heads=4, head_dim=8), {"llama_rms"}),
    "gemma": ({}, {"gemma_rms"}),
    "gemma2": ({}, {"gemma_rms"}),
    "gemma3_text": (dict(sliding_window=8), {"gemma_rms"}),  # q/k norms on non-contiguous views
    "olmo": ({}, {"olmo_layer"}),
    "olmo2": ({}, {"olmo2_rms"}),
    "cohere": ({}, {"cohere_layer"}),
}
SEQ2SEQ = {"t5": (dict(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16), {"t5"})}


def make_model(model_type: str, dtype=torch.float32):
    torch.manual_seed(0)
    if model_type in SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **SEQ2SEQ[model_type][0]))
    else:
        extra = CAUSAL_LM[model_type][0]
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **extra}))
    with torch.no_grad():
        for module in model.modules():
            if convert.form_of(module) is not None and getattr(module, "weight", None) is not None:
                module.weight.normal_(0.0, 0.5)
    return model.to(dtype).eval()


def model_inputs(model_type: str):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, decoder_input_ids=ids) if model_type in SEQ2SEQ else dict(input_ids=ids)


def logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logits.double() * probe).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


ALL_FAMILIES = sorted(CAUSAL_LM) + sorted(SEQ2SEQ)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_fp32_outputs_and_gradients_equal_the_original(model_type):
    model = make_model(model_type)
    converted = ln_ext.convert_layer_norm(copy.deepcopy(model), strict=True)
    forms = {convert.converted_form(m) for m in converted.modules()} - {None}
    expected = (CAUSAL_LM.get(model_type) or SEQ2SEQ[model_type])[1]
    assert forms == expected
    inputs = model_inputs(model_type)
    ref_logits, ref_grads = logits_and_grads(model, inputs)
    logits, grads = logits_and_grads(converted, inputs)
    assert rel_err(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name
    # The class, Parameters and state_dict are the original's.
    for (name, a), (_, b) in zip(model.named_modules(), converted.named_modules()):
        assert type(a) is type(b), name
    assert converted.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "olmo", "olmo2", "cohere", "t5"])
def test_bf16_error_against_float64_at_most_twice_the_originals(model_type):
    model = make_model(model_type)
    inputs = model_inputs(model_type)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(**inputs).logits
        original = copy.deepcopy(model).to(torch.bfloat16)(**inputs).logits
        ours = ln_ext.convert_layer_norm(copy.deepcopy(model).to(torch.bfloat16), strict=True)(**inputs).logits
    assert ours.dtype == original.dtype
    assert rel_err(ours, exact) <= 2 * rel_err(original, exact) + 1e-3


def test_mixed_dtypes_keep_each_forms_result_dtype():
    """An fp32 weight beside a bf16 input: the Llama form returns fp32 (weight * x̂ after the
    cast back), Gemma and OLMo 2 return bf16 (one cast at the end), T5 fp32 (x * rstd in fp32,
    a float32 weight keeps it)."""
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for model_type, path in [("llama", "model.norm"), ("gemma", "model.norm"), ("olmo2", "model.norm"),
                             ("t5", "encoder.final_layer_norm")]:
        module = make_model(model_type).get_submodule(path)
        expected = module(x)
        ln_ext.convert_layer_norm(module)
        y = module(x)
        assert y.dtype == expected.dtype, model_type
        assert rel_err(y, expected) < 1e-2, model_type


def captured_norm_inputs(model, inputs):
    """Each converted module with the input it got in one forward pass."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, seen=seen: seen.setdefault(mod, args[0].detach()))
             for m in model.modules() if convert.converted_form(m) is not None]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "olmo", "t5"])
def test_every_norm_module_runs_an_ln_ext_op(model_type):
    model = ln_ext.convert_layer_norm(make_model(model_type), strict=True)
    norms = [m for m in model.modules() if convert.converted_form(m) is not None]
    seen = captured_norm_inputs(model, model_inputs(model_type))
    assert set(seen) == set(norms)  # every converted module was called
    for module, x in seen.items():
        with torch.profiler.profile() as prof:
            module(x)
        names = [e.name for e in prof.events()]
        assert any(n.startswith("ln_ext::") for n in names), type(module).__name__
        assert "aten::rsqrt" not in names


def test_save_load_round_trips_into_an_unconverted_model(tmp_path):
    model = make_model("gemma2")
    converted = ln_ext.convert_layer_norm(copy.deepcopy(model))
    converted.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(convert.converted_form(m) is None for m in loaded.modules())
    inputs = model_inputs("gemma2")
    with torch.no_grad():
        assert rel_err(loaded(**inputs).logits, converted(**inputs).logits) < 1e-5
    # ... and an unconverted state_dict loads strictly into a converted model.
    converted.load_state_dict(model.state_dict(), strict=True)


def test_deepcopy_pickle_generate_and_training_flag():
    model = make_model("llama")
    converted = ln_ext.convert_layer_norm(copy.deepcopy(model))
    twin = copy.deepcopy(converted)
    norm = twin.model.norm
    assert norm.forward.args[0] is norm  # the copy's forward is bound to the copy
    ids = model_inputs("llama")["input_ids"]
    out = twin.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))
    converted.train()
    assert converted.model.norm.training and not model.model.norm.training
    # A whole-model pickle (torch.save) finds the forward by name.
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).eval()
    assert convert.converted_form(restored.model.norm) == "llama_rms"
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, converted.eval()(ids).logits)


def test_compile_fullgraph_of_a_converted_model():
    model = ln_ext.convert_layer_norm(make_model("gemma2"))
    inputs = model_inputs("gemma2")
    with torch.no_grad():
        expected = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True)
        assert rel_err(compiled(**inputs).logits, expected) < 1e-5


def test_strict_names_what_it_left_and_subclasses_stay_alone():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyNorm(LlamaRMSNorm):  # a subclass may have its own forward
        pass

    model = torch.nn.Sequential(LlamaRMSNorm(8), MyNorm(8))
    ln_ext.convert_layer_norm(model)
    assert convert.converted_form(model[0]) == "llama_rms" and convert.converted_form(model[1]) is None
    with pytest.raises(RuntimeError, match=r"1: .*MyNorm"):
        ln_ext.convert_layer_norm(model, strict=True)
    # rms_norm=False leaves the RMS forms alone.
    plain = torch.nn.Sequential(LlamaRMSNorm(8))
    ln_ext.convert_layer_norm(plain, rms_norm=False)
    assert convert.converted_form(plain[0]) is None


# ---------------------------------------------------------------- the table vs transformers' source

def _forward_source(cls_node: ast.ClassDef) -> tuple:
    """The bodies of forward and _norm, docstrings dropped: what the math of a norm class is."""
    def body(fn):
        stmts = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                                and isinstance(fn.body[0].value, ast.Constant)) else fn.body
        return "\n".join(ast.unparse(s) for s in stmts)
    methods = {n.name: n for n in cls_node.body if isinstance(n, ast.FunctionDef)}
    return tuple(body(methods[m]) if m in methods else None for m in ("forward", "_norm"))


def _transformers_classes() -> dict:
    root = os.path.dirname(transformers.__file__)
    classes = {}
    for path in glob.glob(os.path.join(root, "models", "*", "modeling_*.py")):
        module = "transformers." + os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.ClassDef):
                classes[f"{module}.{node.name}"] = _forward_source(node)
    return classes


# The classes whose forward (and _norm) each form was written from; two where transformers
# writes the same math two ways.
REFERENCES = {
    "llama_rms": ["llama.modeling_llama.LlamaRMSNorm"],
    "olmo2_rms": ["olmo2.modeling_olmo2.Olmo2RMSNorm", "nemotron_h.modeling_nemotron_h.NemotronHRMSNorm"],
    "gemma_rms": ["gemma.modeling_gemma.GemmaRMSNorm"],
    "gemma4_rms": ["gemma4.modeling_gemma4.Gemma4RMSNorm", "moshi.modeling_moshi.MoshiRMSNorm"],
    "unweighted_rms": ["llama4.modeling_llama4.Llama4TextL2Norm"],
    "t5": ["t5.modeling_t5.T5LayerNorm"],
    "cohere_layer": ["cohere.modeling_cohere.CohereLayerNorm"],
    "olmo_layer": ["olmo.modeling_olmo.OlmoLayerNorm"],
    "layer_data_format": ["convnext.modeling_convnext.ConvNextLayerNorm"],
    "layer_2d": ["eomt.modeling_eomt.EomtLayerNorm2d"],
    "layer_plus_one": ["videoprism.modeling_videoprism.VideoPrismLayerNorm"],
}


def test_table_matches_the_installed_transformers():
    """Each table entry's forward is one of its form's reference classes', and every class of
    the installed transformers with such a forward is in the table under that form."""
    classes = _transformers_classes()
    sources = {form: {classes["transformers.models." + r] for r in refs} for form, refs in REFERENCES.items()}
    for path, form in convert.TABLE.items():
        if path.startswith("transformers."):
            assert classes.get(path) in sources[form], f"{path} no longer has {form}'s forward"
    for form, srcs in sources.items():
        missing = sorted(p for p, src in classes.items() if src in srcs and convert.TABLE.get(p) != form)
        assert not missing, f"classes with {form}'s forward not in the table under it: {missing}"


def test_table_classes_import_by_their_path():
    # A few of each library: the path is the class's own module and name.
    for path in ["transformers.models.llama.modeling_llama.LlamaRMSNorm",
                 "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm",
                 "transformers.models.t5.modeling_t5.T5LayerNorm"]:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert f"{cls.__module__}.{cls.__qualname__}" == path


# ---------------------------------------------------------------- timm

timm_models = [("test_vit", (1, 3, 160, 160)), ("test_convnext", (1, 3, 64, 64)),
               ("test_efficientnet_ln", (1, 3, 64, 64))]


def make_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if convert.form_of(module) is not None and getattr(module, "weight", None) is not None:
                module.weight.normal_(1.0, 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("name,shape", timm_models)
def test_timm_models(name, shape):
    model = make_timm(name)
    converted = ln_ext.convert_layer_norm(copy.deepcopy(model), strict=True)
    forms = {convert.converted_form(m) for m in converted.modules()} - {None}
    assert forms, "nothing converted"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ref = model(x)
    ref.double().square().sum().backward()
    out = converted(x)
    out.double().square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    ref_grads = dict(model.named_parameters())
    for n, p in converted.named_parameters():
        assert rel_err(p.grad, ref_grads[n].grad) < 1e-4, n
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        original = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16())
        ours = ln_ext.convert_layer_norm(copy.deepcopy(model).to(torch.bfloat16))(x.bfloat16())
    assert rel_err(ours, exact) <= 2 * rel_err(original, exact) + 1e-3
    assert converted.state_dict().keys() == model.state_dict().keys()


def test_timm_forms_present():
    """ViT runs timm's LayerNorm, ConvNeXt its LayerNorm2d, the LN EfficientNet LayerNormAct2d."""
    got = {name: {convert.converted_form(m) for m in ln_ext.convert_layer_norm(make_timm(name)).modules()} - {None}
           for name, _ in timm_models}
    assert "layer" in got["test_vit"]
    assert "layer_2d" in got["test_convnext"]
    assert "layer_act_2d" in got["test_efficientnet_ln"]
