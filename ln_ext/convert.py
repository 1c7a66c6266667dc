"""convert_layer_norm: gives a model's norm modules ln_ext's kernels.

Two kinds of module are converted:
- plain `nn.LayerNorm` / `nn.RMSNorm` (their exact class): swapped for `ln_ext.LayerNorm` /
  `ln_ext.RMSNorm`, subclasses of theirs holding the same Parameters;
- the norm classes of transformers and timm named in FORMS below (exact class, by module path
  and name, so neither library is imported here): the module stays what it is (class, Parameters,
  state_dict, attributes, train/eval flag) and gets an instance `forward` that runs ln_ext's
  kernels with that class's own math: its kind (LayerNorm or RMSNorm), weight offset (Gemma's
  zero-centered 1 + w), eps attribute and result dtype (where its float32 upcast and the cast
  back sit relative to the weight multiply). This is how transformers' own `kernelize` swaps a
  forward, so PEFT's and transformers' isinstance checks, deepcopy and save/load keep working.

Subclasses of a known class and unknown classes are left alone (their forward may differ);
`strict=True` names every norm-like module left unconverted.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from .modules import LayerNorm, RMSNorm

_REDUCED = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class NormForm:
    """The math of a family of norm classes, in terms of ln_ext's kernels.

    result: how the class forms its output dtype, x being its input and w its weight:
      "torch"   as F.layer_norm / F.rms_norm (x's dtype; float32 under CUDA autocast)
      "input"   x's dtype: float32 math, weight applied in float32, one cast at the end
                (Gemma, OLMo 2, Cohere, OlmoLayerNorm)
      "promote" promote(x, w): x̂ cast back to x's dtype, then w * x̂ (Llama: an fp32
                weight beside a bf16 input gives fp32)
      "t5"      w's dtype when it is 16-bit, else promote(x, float32, w) (T5LayerNorm)
    The kernels compute in float32 (float64 for double) and round once, to the result
    dtype where they can write it (the input's, or float32 beside a 16-bit input) and to
    the input's then cast otherwise (a rare mix, e.g. a bf16 weight beside an fp32 input).
    """

    centered: bool                       # LayerNorm (mean, bias) or RMSNorm
    result: str = "input"
    weight_offset: float = 0.0           # gain = weight_offset + weight
    eps_attr: Optional[str] = "eps"      # None: `eps` below is fixed by the class
    eps: float = 1e-5
    weight: bool = True                  # has a `weight` (possibly None); False: never
    channels_first: Callable[[nn.Module], bool] = lambda m: False  # normalize dim 1 of (B, C, *)
    activation: bool = False             # timm's NormAct: self.drop, then self.act, after the norm
    convertible: Callable[[nn.Module], bool] = lambda m: True      # per-instance condition


def _data_format_channels_first(m: nn.Module) -> bool:
    return getattr(m, "data_format", "channels_last") == "channels_first"


def _one_dim_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return w is None or w.dim() == 1


FORMS: dict[str, NormForm] = {
    # x.float() normalized, cast to x's dtype, then weight * x̂ (LlamaRMSNorm and its copies).
    "llama_rms": NormForm(centered=False, result="promote", eps_attr="variance_epsilon"),
    # (weight * x̂) in float32, then the cast (Olmo2RMSNorm, NemotronHRMSNorm).
    "olmo2_rms": NormForm(centered=False, eps_attr="variance_epsilon"),
    # x̂ * (1 + weight) in float32, one cast at the end; weight initialized to zeros.
    "gemma_rms": NormForm(centered=False, weight_offset=1.0),
    # x̂ * weight in float32 (weight absent when with_scale=False), one cast (Gemma 3n/4, Moshi).
    "gemma4_rms": NormForm(centered=False),
    # x̂ alone, float32, one cast (Llama4TextL2Norm, FalconMambaWeightlessRMSNorm, ...).
    "unweighted_rms": NormForm(centered=False, weight=False),
    # float32 variance, x * rstd, cast to the weight's dtype when that is 16-bit.
    "t5": NormForm(centered=False, result="t5", eps_attr="variance_epsilon"),
    # float32 LayerNorm without bias, weight in float32, one cast (Cohere; a 2-D per-head
    # weight, its QK-norm form, is left alone).
    "cohere_layer": NormForm(centered=True, eps_attr="variance_epsilon", convertible=_one_dim_weight),
    # float32 LayerNorm, no parameters, eps 1e-5, cast back.
    "olmo_layer": NormForm(centered=True, eps_attr=None, eps=1e-5, weight=False),
    # nn.LayerNorm subclasses: nn.LayerNorm's math, on x or, channels-first, over dim 1.
    "layer": NormForm(centered=True, result="torch"),
    "layer_data_format": NormForm(centered=True, result="torch", channels_first=_data_format_channels_first),
    "layer_2d": NormForm(centered=True, result="torch", channels_first=lambda m: True),
    "layer_plus_one": NormForm(centered=True, result="torch", weight_offset=1.0),  # F.layer_norm(x, s, w + 1, b)
    "layer_act": NormForm(centered=True, result="torch", activation=True),
    "layer_act_2d": NormForm(centered=True, result="torch", activation=True, channels_first=lambda m: True),
    # timm's RmsNorm: x * rsqrt(mean(x²) + eps) * weight in x's dtype (ln_ext: in float32).
    "timm_rms": NormForm(centered=False, result="promote"),
    "timm_rms_2d": NormForm(centered=False, result="promote", channels_first=lambda m: True),
    # timm's *Fp32 variants: the same in float32 with float32 parameters, cast back.
    "layer_fp32": NormForm(centered=True),
    "layer_2d_fp32": NormForm(centered=True, channels_first=lambda m: True),
    "timm_rms_fp32": NormForm(centered=False),
    "timm_rms_2d_fp32": NormForm(centered=False, channels_first=lambda m: True),
}

# transformers' norm classes by form, as "<model>.<modeling module>.<class>" under
# transformers.models (transformers 5.23). tests/test_convert_models.py checks each entry's
# forward (and _norm) against its form's first class, and that no class of the installed
# transformers with one of these forwards is missing.
_TRANSFORMERS = {
    "llama_rms": (
        "llama.modeling_llama.LlamaRMSNorm", "aimv2.modeling_aimv2.Aimv2RMSNorm",
        "apertus.modeling_apertus.ApertusRMSNorm", "arcee.modeling_arcee.ArceeRMSNorm",
        "aria.modeling_aria.AriaTextRMSNorm", "axk1.modeling_axk1.AXK1RMSNorm",
        "axk2.modeling_axk2.AXK2RMSNorm", "bailing_hybrid.modeling_bailing_hybrid.BailingHybridRMSNorm",
        "bamba.modeling_bamba.BambaRMSNorm", "bitnet.modeling_bitnet.BitNetRMSNorm",
        "blt.modeling_blt.BltRMSNorm", "chameleon.modeling_chameleon.ChameleonRMSNorm",
        "clvp.modeling_clvp.ClvpRMSNorm", "cohere2_moe.modeling_cohere2_moe.Cohere2MoeRMSNorm",
        "cosmos3_edge.modeling_cosmos3_edge.Cosmos3EdgeTextRMSNorm", "csm.modeling_csm.CsmRMSNorm",
        "cwm.modeling_cwm.CwmRMSNorm", "deepseek_ocr2.modeling_deepseek_ocr2.DeepseekOcr2TextRMSNorm",
        "deepseek_ocr2.modeling_deepseek_ocr2.DeepseekOcr2VisionRMSNorm",
        "deepseek_v2.modeling_deepseek_v2.DeepseekV2RMSNorm",
        "deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm",
        "deepseek_v32.modeling_deepseek_v32.DeepseekV32RMSNorm", "deimv2.modeling_deimv2.Deimv2RMSNorm",
        "dia.modeling_dia.DiaRMSNorm", "diffllama.modeling_diffllama.DiffLlamaRMSNorm",
        "doge.modeling_doge.DogeRMSNorm", "dots1.modeling_dots1.Dots1RMSNorm",
        "dots3_note.modeling_dots3_note.Dots3NoteRMSNorm", "emu3.modeling_emu3.Emu3RMSNorm",
        "ernie4_5.modeling_ernie4_5.Ernie4_5RMSNorm",
        "ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeRMSNorm",
        "ernie4_5_vl_moe.modeling_ernie4_5_vl_moe.Ernie4_5_VLMoeRMSNorm",
        "eurobert.modeling_eurobert.EuroBertRMSNorm", "evolla.modeling_evolla.EvollaRMSNorm",
        "exaone4.modeling_exaone4.Exaone4RMSNorm", "exaone4_5.modeling_exaone4_5.Exaone4_5_RMSNorm",
        "exaone_moe.modeling_exaone_moe.ExaoneMoeRMSNorm", "falcon_h1.modeling_falcon_h1.FalconH1RMSNorm",
        "falcon_mamba.modeling_falcon_mamba.FalconMambaRMSNorm", "glm.modeling_glm.GlmRMSNorm",
        "glm4.modeling_glm4.Glm4RMSNorm", "glm4_moe.modeling_glm4_moe.Glm4MoeRMSNorm",
        "glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteRMSNorm", "glm4v.modeling_glm4v.Glm4vRMSNorm",
        "glm4v_moe.modeling_glm4v_moe.Glm4vMoeRMSNorm", "glm4v_moe.modeling_glm4v_moe.Glm4vMoeTextRMSNorm",
        "glm5_next.modeling_glm5_next.Glm5NextRMSNorm", "glm5_next.modeling_glm5_next.Glm5NextTextRMSNorm",
        "glm_image.modeling_glm_image.GlmImageRMSNorm", "glm_moe_dsa.modeling_glm_moe_dsa.GlmMoeDsaRMSNorm",
        "glm_ocr.modeling_glm_ocr.GlmOcrRMSNorm", "granite.modeling_granite.GraniteRMSNorm",
        "granite4_vision.modeling_granite4_vision.Granite4VisionTextRMSNorm",
        "granite_docling.modeling_granite_docling.GraniteDoclingTextRMSNorm",
        "granite_swa.modeling_granite_swa.GraniteSWARMSNorm",
        "granitemoe.modeling_granitemoe.GraniteMoeRMSNorm",
        "granitemoe_swa.modeling_granitemoe_swa.GraniteMoeSWARMSNorm",
        "granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridRMSNorm",
        "granitemoeshared.modeling_granitemoeshared.GraniteMoeSharedRMSNorm",
        "higgs_audio_v2.modeling_higgs_audio_v2.HiggsAudioV2RMSNorm",
        "hunyuan_v1_dense.modeling_hunyuan_v1_dense.HunYuanDenseV1RMSNorm",
        "hunyuan_v1_moe.modeling_hunyuan_v1_moe.HunYuanMoEV1RMSNorm",
        "hunyuan_vl.modeling_hunyuan_vl.HunYuanVLRMSNorm", "hy_v3.modeling_hy_v3.HYV3RMSNorm",
        "hy_v4.modeling_hy_v4.HYV4RMSNorm", "hyperclovax.modeling_hyperclovax.HyperCLOVAXRMSNorm",
        "idefics2.modeling_idefics2.Idefics2RMSNorm", "idefics3.modeling_idefics3.Idefics3RMSNorm",
        "inkling.modeling_inkling.InklingRMSNorm", "internvl.modeling_internvl.InternVLVisionRMSNorm",
        "jamba.modeling_jamba.JambaRMSNorm", "jetmoe.modeling_jetmoe.JetMoeRMSNorm",
        "kimi_linear.modeling_kimi_linear.KimiLinearRMSNorm", "kolibri1.modeling_kolibri1.Kolibri1RMSNorm",
        "laguna.modeling_laguna.LagunaRMSNorm", "lfm2.modeling_lfm2.Lfm2RMSNorm",
        "lfm2_moe.modeling_lfm2_moe.Lfm2MoeRMSNorm", "lfm3.modeling_lfm3.Lfm3RMSNorm",
        "lfm3_vl.modeling_lfm3_vl.Lfm3VlVisionRMSNorm",
        "lighton_ocr.modeling_lighton_ocr.LightOnOcrRMSNorm",
        "longcat_flash.modeling_longcat_flash.LongcatFlashRMSNorm", "mamba.modeling_mamba.MambaRMSNorm",
        "mamba2.modeling_mamba2.Mamba2RMSNorm", "mellum.modeling_mellum.MellumRMSNorm",
        "mimo_v2_flash.modeling_mimo_v2_flash.MiMoV2FlashRMSNorm",
        "minicpm3.modeling_minicpm3.MiniCPM3RMSNorm", "minimax.modeling_minimax.MiniMaxRMSNorm",
        "minimax_m2.modeling_minimax_m2.MiniMaxM2RMSNorm", "ministral.modeling_ministral.MinistralRMSNorm",
        "ministral3.modeling_ministral3.Ministral3RMSNorm", "mistral.modeling_mistral.MistralRMSNorm",
        "mistral3.modeling_mistral3.Mistral3RMSNorm", "mistral4.modeling_mistral4.Mistral4RMSNorm",
        "mistral_large4.modeling_mistral_large4.MistralLarge4RMSNorm",
        "mixtral.modeling_mixtral.MixtralRMSNorm", "mllama.modeling_mllama.MllamaTextRMSNorm",
        "molmo2.modeling_molmo2.Molmo2RMSNorm",
        "muse_glimmer_assistant.modeling_muse_glimmer_assistant.MuseGlimmerAssistantRMSNorm",
        "neucodec.modeling_neucodec.NeuCodecRMSNorm", "olmoe.modeling_olmoe.OlmoeRMSNorm",
        "ovis2.modeling_ovis2.Ovis2RMSNorm", "paddleocr_vl.modeling_paddleocr_vl.PaddleOCRRMSNorm",
        "pe_audio.modeling_pe_audio.PeAudioEncoderRMSNorm",
        "pe_audio_video.modeling_pe_audio_video.PeAudioVideoEncoderRMSNorm",
        "pe_video.modeling_pe_video.PeVideoEncoderRMSNorm", "phi3.modeling_phi3.Phi3RMSNorm",
        "phi4_multimodal.modeling_phi4_multimodal.Phi4MultimodalRMSNorm",
        "pixtral.modeling_pixtral.PixtralRMSNorm",
        "qianfan_ocr.modeling_qianfan_ocr.QianfanOCRVisionRMSNorm", "qwen2.modeling_qwen2.Qwen2RMSNorm",
        "qwen2_5_omni.modeling_qwen2_5_omni.Qwen2_5OmniRMSNorm",
        "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLRMSNorm", "qwen2_moe.modeling_qwen2_moe.Qwen2MoeRMSNorm",
        "qwen2_vl.modeling_qwen2_vl.Qwen2VLRMSNorm", "qwen3.modeling_qwen3.Qwen3RMSNorm",
        "qwen3_moe.modeling_qwen3_moe.Qwen3MoeRMSNorm",
        "qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeCode2WavRMSNorm",
        "qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeRMSNorm",
        "qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeTextRMSNorm",
        "qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeThinkerTextRMSNorm",
        "qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRMSNorm",
        "qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextRMSNorm",
        "sapiens2.modeling_sapiens2.Sapiens2RMSNorm", "seed_oss.modeling_seed_oss.SeedOssRMSNorm",
        "smollm3.modeling_smollm3.SmolLM3RMSNorm", "solar_open.modeling_solar_open.SolarOpenRMSNorm",
        "timesfm.modeling_timesfm.TimesFmRMSNorm", "timesfm2_5.modeling_timesfm2_5.TimesFm2_5RMSNorm",
        "ultrabert.modeling_ultrabert.UltrabertRMSNorm", "ultravbert.modeling_ultravbert.UltraVBertRMSNorm",
        "unlimited_ocr.modeling_unlimited_ocr.UnlimitedOcrTextRMSNorm",
        "vibevoice.modeling_vibevoice.VibeVoiceRMSNorm",
        "vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer.VibeVoiceAcousticTokenizerRMSNorm",
        "vibevoice_asr.modeling_vibevoice_asr.VibeVoiceAsrRMSNorm",
        "voxtral_realtime.modeling_voxtral_realtime.VoxtralRealtimeRMSNorm",
        "xcodec2.modeling_xcodec2.Xcodec2RMSNorm", "youtu.modeling_youtu.YoutuRMSNorm",
        "zamba.modeling_zamba.ZambaRMSNorm", "zamba2.modeling_zamba2.Zamba2RMSNorm",
        "zaya.modeling_zaya.ZayaRMSNorm",
    ),
    "olmo2_rms": (
        "olmo2.modeling_olmo2.Olmo2RMSNorm", "afmoe.modeling_afmoe.AfmoeRMSNorm",
        "beam.modeling_beam.BeamRMSNorm", "deepseek_v4.modeling_deepseek_v4.DeepseekV4RMSNorm",
        "flex_olmo.modeling_flex_olmo.FlexOlmoRMSNorm", "flint.modeling_flint.FlintRMSNorm",
        "gpt_oss.modeling_gpt_oss.GptOssRMSNorm", "helium.modeling_helium.HeliumRMSNorm",
        "inkling2.modeling_inkling2.Inkling2RMSNorm", "nemotron_h.modeling_nemotron_h.NemotronHRMSNorm",
        "nemotron_h_omni.modeling_nemotron_h_omni.NemotronH_Omni_RMSNorm",
        "olmo3.modeling_olmo3.Olmo3RMSNorm", "olmo_hybrid.modeling_olmo_hybrid.OlmoHybridRMSNorm",
        "openai_privacy_filter.modeling_openai_privacy_filter.OpenAIPrivacyFilterRMSNorm",
    ),
    "gemma_rms": (
        "gemma.modeling_gemma.GemmaRMSNorm", "gemma2.modeling_gemma2.Gemma2RMSNorm",
        "gemma3.modeling_gemma3.Gemma3RMSNorm", "minimax_m3_vl.modeling_minimax_m3_vl.MiniMaxM3VLRMSNorm",
        "muse_glimmer.modeling_muse_glimmer.MuseGlimmerTextCenteredRMSNorm",
        "qwen3_5.modeling_qwen3_5.Qwen3_5RMSNorm", "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeRMSNorm",
        "qwen3_next.modeling_qwen3_next.Qwen3NextRMSNorm",
        "recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRMSNorm",
        "step3p7.modeling_step3p7.Step3p7RMSNorm", "t5gemma.modeling_t5gemma.T5GemmaRMSNorm",
        "t5gemma2.modeling_t5gemma2.T5Gemma2RMSNorm", "vaultgemma.modeling_vaultgemma.VaultGemmaRMSNorm",
    ),
    "gemma4_rms": (
        "gemma4.modeling_gemma4.Gemma4RMSNorm",
        "diffusion_gemma.modeling_diffusion_gemma.DiffusionGemmaRMSNorm",
        "embedding_gemma2.modeling_embedding_gemma2.EmbeddingGemma2RMSNorm",
        "gemma3n.modeling_gemma3n.Gemma3nRMSNorm",
        "gemma4_unified.modeling_gemma4_unified.Gemma4UnifiedRMSNorm",
        "kyutai_speech_to_text.modeling_kyutai_speech_to_text.KyutaiSpeechToTextRMSNorm",
        "moshi.modeling_moshi.MoshiRMSNorm", "muse_glimmer.modeling_muse_glimmer.MuseGlimmerRMSNorm",
        "muse_spark.modeling_muse_spark.MuseSparkRMSNorm", "neomme.modeling_neomme.NeoMMERMSNorm",
    ),
    "unweighted_rms": (
        "llama4.modeling_llama4.Llama4TextL2Norm", "esmfold2.modeling_esmfold2.EsmFold2RMSNorm",
        "falcon_mamba.modeling_falcon_mamba.FalconMambaWeightlessRMSNorm",
        "hrm_text.modeling_hrm_text.HrmTextRMSNorm", "nanochat.modeling_nanochat.NanoChatRMSNorm",
    ),
    "t5": (
        "t5.modeling_t5.T5LayerNorm", "idefics.modeling_idefics.IdeficsRMSNorm",
        "kosmos2_5.modeling_kosmos2_5.Kosmos2_5LayerNorm", "longt5.modeling_longt5.LongT5LayerNorm",
        "mt5.modeling_mt5.MT5LayerNorm", "pix2struct.modeling_pix2struct.Pix2StructLayerNorm",
        "pop2piano.modeling_pop2piano.Pop2PianoLayerNorm",
        "switch_transformers.modeling_switch_transformers.SwitchTransformersLayerNorm",
        "udop.modeling_udop.UdopLayerNorm", "umt5.modeling_umt5.UMT5LayerNorm",
    ),
    "cohere_layer": (
        "cohere.modeling_cohere.CohereLayerNorm", "cohere2.modeling_cohere2.Cohere2LayerNorm",
        "cohere2_moe.modeling_cohere2_moe.Cohere2MoeLayerNorm",
        "cohere_compass.modeling_cohere_compass.CohereCompassLayerNorm",
    ),
    "olmo_layer": (
        "olmo.modeling_olmo.OlmoLayerNorm",
    ),
    "layer_data_format": (
        "convnext.modeling_convnext.ConvNextLayerNorm",
        "convnextv2.modeling_convnextv2.ConvNextV2LayerNorm",
        "deepseek_ocr2.modeling_deepseek_ocr2.DeepseekOcr2SamLayerNorm",
        "deepseek_vl_hybrid.modeling_deepseek_vl_hybrid.DeepseekVLHybridLayerNorm",
        "dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayerNorm",
        "edgetam.modeling_edgetam.EdgeTamLayerNorm",
        "edgetam_video.modeling_edgetam_video.EdgeTamVideoLayerNorm",
        "got_ocr2.modeling_got_ocr2.GotOcr2LayerNorm", "lw_detr.modeling_lw_detr.LwDetrLayerNorm",
        "pp_formulanet.modeling_pp_formulanet.PPFormulaNetLayerNorm",
        "rf_detr.modeling_rf_detr.RfDetrLayerNorm", "sam.modeling_sam.SamLayerNorm",
        "sam2.modeling_sam2.Sam2LayerNorm", "sam2_video.modeling_sam2_video.Sam2VideoLayerNorm",
        "sam3_tracker.modeling_sam3_tracker.Sam3TrackerLayerNorm",
        "sam3_tracker_video.modeling_sam3_tracker_video.Sam3TrackerVideoLayerNorm",
        "sam_hq.modeling_sam_hq.SamHQLayerNorm", "seggpt.modeling_seggpt.SegGptLayerNorm",
        "slanext.modeling_slanext.SLANeXtLayerNorm",
        "unlimited_ocr.modeling_unlimited_ocr.UnlimitedOcrSamLayerNorm",
    ),
    "layer_2d": (
        "eomt.modeling_eomt.EomtLayerNorm2d", "eomt_dinov3.modeling_eomt_dinov3.EomtDinov3LayerNorm2d",
        "videomt.modeling_videomt.VideomtLayerNorm2d",
    ),
    "layer_plus_one": ("videoprism.modeling_videoprism.VideoPrismLayerNorm",),
}
# timm's norm layers (timm 1.0.31), by their defining module.
_TIMM = {
    "layer": ("norm.LayerNorm",),
    "layer_2d": ("norm.LayerNorm2d",),
    "layer_fp32": ("norm.LayerNormFp32",),
    "layer_2d_fp32": ("norm.LayerNorm2dFp32",),
    "layer_act": ("norm_act.LayerNormAct",),
    "layer_act_2d": ("norm_act.LayerNormAct2d",),
    "timm_rms": ("norm.RmsNorm",),
    "timm_rms_2d": ("norm.RmsNorm2d",),
    "timm_rms_fp32": ("norm.RmsNormFp32",),
    "timm_rms_2d_fp32": ("norm.RmsNorm2dFp32",),
}
# The table: exact class path -> form name.
TABLE: dict[str, str] = {
    **{f"transformers.models.{path}": form for form, paths in _TRANSFORMERS.items() for path in paths},
    **{f"timm.layers.{path}": form for form, paths in _TIMM.items() for path in paths},
}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def form_of(module: nn.Module) -> Optional[str]:
    """The FORMS name of a module's exact class, or None."""
    return TABLE.get(_class_path(type(module)))


def _result_dtype(form: NormForm, x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.dtype:
    if form.result == "promote" and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    if form.result == "t5" and weight is not None:
        if weight.dtype in _REDUCED:
            return weight.dtype
        return torch.promote_types(torch.promote_types(x.dtype, torch.float32), weight.dtype)
    return x.dtype


def _params_for_kernel(x: torch.Tensor, weight, bias):
    """weight and bias in a dtype the kernels take beside x (x's, or float32 beside a 16-bit
    x), and one dtype for both. A conversion, where one is needed, is exact (to a wider
    type) and costs N elements, not a pass over x."""
    allowed = (x.dtype, torch.float32) if x.dtype in _REDUCED else (x.dtype,)
    wide = torch.float32 if x.dtype in _REDUCED else x.dtype
    present = [p for p in (weight, bias) if p is not None]
    if all(p.dtype in allowed for p in present) and len({p.dtype for p in present}) <= 1:
        return weight, bias
    return tuple(None if p is None else p.to(wide) for p in (weight, bias))


def norm_with_form(form: NormForm, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `module` (of a class with this form) computes on x, by ln_ext's kernels."""
    weight = getattr(module, "weight", None) if form.weight else None
    bias = getattr(module, "bias", None) if form.centered else None
    eps = getattr(module, form.eps_attr) if form.eps_attr else form.eps
    offset = form.weight_offset if weight is not None else 0.0
    if form.result == "torch":
        # nn.LayerNorm's dtypes, CUDA autocast included (its float32 policy).
        out_dtype, weight, bias = ops._autocast_args(x, weight, bias)
        result = out_dtype or x.dtype
    else:
        result = _result_dtype(form, x, weight)
    weight, bias = _params_for_kernel(x, weight, bias)
    # The kernels write y in x's dtype or, beside a 16-bit x, float32; any other result
    # dtype is a cast afterwards.
    kernel_out = result if result == x.dtype or (x.dtype in _REDUCED and result == torch.float32) else x.dtype
    if form.channels_first(module):
        if form.centered:
            y = ops.layer_norm_channels_first(x, weight, bias, eps, weight_offset=offset, out_dtype=kernel_out)
        else:
            y = ops.rms_norm_channels_first(x, weight, eps, weight_offset=offset, out_dtype=kernel_out)
    else:
        shape = getattr(module, "normalized_shape", None) or (x.shape[-1],)
        if form.centered:
            y = ops.layer_norm(x, shape, weight, bias, eps, weight_offset=offset, out_dtype=kernel_out)
        else:
            y = ops.rms_norm(x, shape, weight, eps, weight_offset=offset, out_dtype=kernel_out)
    if y.dtype != result:
        y = y.to(result)
    if form.activation:
        y = module.act(module.drop(y))
    return y


def _converted_forward(module: nn.Module, form_name: str, x: torch.Tensor) -> torch.Tensor:
    return norm_with_form(FORMS[form_name], module, x)


def converted_form(module: nn.Module) -> Optional[str]:
    """The form whose ln_ext forward `module` runs, if convert_layer_norm gave it one."""
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, functools.partial) and fwd.func is _converted_forward:
        return fwd.args[1]
    return None


def _swapped(module: nn.Module) -> nn.Module:
    """The ln_ext module standing in for a plain nn.LayerNorm / nn.RMSNorm, holding its
    Parameter objects."""
    placeholders = {"device": "meta"}  # the original Parameters are moved in below
    if type(module) is nn.LayerNorm:
        converted = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                              bias=module.bias is not None, **placeholders)
        converted.bias = module.bias
    else:
        converted = RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                            **placeholders)
    converted.weight = module.weight
    converted.train(module.training)
    return converted


_NORM_LIKE_NAME = re.compile(r"(LayerNorm|RMSNorm|RmsNorm|L2Norm)(2d|Act|Act2d|Fp32|2dFp32|Gated)?$")


def _looks_like_norm(module: nn.Module) -> bool:
    """A LayerNorm/RMSNorm subclass, a subclass of a class in TABLE, or a class named like a norm."""
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or bool(_NORM_LIKE_NAME.search(type(module).__name__))
            or any(_class_path(cls) in TABLE for cls in type(module).__mro__))


def _convert(module: nn.Module, rms_norm: bool, left: list, prefix: str) -> nn.Module:
    if type(module) is nn.LayerNorm or (rms_norm and type(module) is nn.RMSNorm):
        return _swapped(module)
    name = form_of(module)
    if name is not None and (rms_norm or FORMS[name].centered) and FORMS[name].convertible(module):
        if converted_form(module) is None:
            # A partial of a module-level function: deepcopy rebinds it to the copy, pickle
            # finds it by name (a bound method of a function the class lacks could not be).
            module.forward = functools.partial(_converted_forward, module, name)
        return module
    if _looks_like_norm(module) and not isinstance(module, (LayerNorm, RMSNorm)) and converted_form(module) is None:
        left.append(f"{prefix or '(root)'}: {_class_path(type(module))}")
    for child_name, child in module.named_children():
        new_child = _convert(child, rms_norm, left, f"{prefix}.{child_name}" if prefix else child_name)
        if new_child is not child:
            module.add_module(child_name, new_child)
    return module


def convert_layer_norm(module: nn.Module, rms_norm: bool = True, strict: bool = False) -> nn.Module:
    """Give every norm of `module` whose math ln_ext implements ln_ext's kernels.

    Plain `nn.LayerNorm` (and, unless rms_norm=False, `nn.RMSNorm`) become `ln_ext.LayerNorm`
    / `ln_ext.RMSNorm` holding the same Parameter objects (optimizers keep working) and the
    same training flag. The norm classes of transformers and timm listed in `TABLE` (LlamaRMSNorm
    and its ~140 copies, Gemma's zero-centered RMSNorm, OLMo 2, T5LayerNorm, OlmoLayerNorm,
    Cohere, ConvNeXt's channels-first LayerNorm; timm's LayerNorm, LayerNorm2d, LayerNormAct(2d),
    RmsNorm(2d), ...) keep their class, Parameters, state_dict and attributes and get an
    instance forward with their own math on ln_ext's kernels (rms_norm=False leaves the RMS
    ones alone). Subclasses and unknown classes are left alone; strict=True raises a
    RuntimeError naming every norm-like module (a LayerNorm/RMSNorm subclass, or a class named
    like one) left unconverted. Returns the converted module (a new object only when `module`
    itself is a plain nn.LayerNorm/nn.RMSNorm), as `nn.SyncBatchNorm.convert_sync_batchnorm`.

    Note: in eval mode under no_grad, `nn.TransformerEncoderLayer` may take PyTorch's fused
    "fast path", which reads the norm parameters directly and never calls the norm modules;
    disable it (`torch.backends.mha.set_fastpath_enabled(False)`) to run ln_ext there.
    """
    left: list = []
    converted = _convert(module, rms_norm, left, "")
    if strict and left:
        raise RuntimeError("ln_ext.convert_layer_norm(strict=True): these norm modules were left unconverted "
                           "(a class ln_ext does not know, or a subclass of one):\n  " + "\n  ".join(left))
    return converted
