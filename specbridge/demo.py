"""The main job on an embedded default: a tiny random model generated locally from a config, converted
HF -> Megatron -> HF, with the round trip compared bit for bit and the logits compared with transformers'."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=96, num_hidden_layers=3, max_position_embeddings=128, rms_norm_eps=1e-5,
            initializer_range=0.1)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)

# Gemma 4: sliding layers head_dim 16 / 2 KV heads, full layers 32 / 1 KV head (K=V), window 4 < sequence
GEMMA4 = dict(vocab_size=128, hidden_size=64, intermediate_size=40, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                           "full_attention"], sliding_window=4, hidden_size_per_layer_input=0,
              final_logit_softcapping=30.0, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
              attn_implementation="eager")
GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24)
# E2B / E4B style: per-layer embeddings (width 8) and a KV-shared tail (E2B's with the double-wide MLP); the shared
# layers' K/V sources (the last non-shared layer of each type) sit before the tail
GEMMA4_E2B = dict(GEMMA4, num_hidden_layers=6, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                            "sliding_attention", "sliding_attention", "full_attention"],
                  hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, num_kv_shared_layers=3,
                  use_double_wide_mlp=True, attention_k_eq_v=False, initializer_range=0.05)
GEMMA4_E4B = dict(GEMMA4, num_hidden_layers=7, layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                                            "full_attention", "sliding_attention", "sliding_attention",
                                                            "full_attention"],
                  hidden_size_per_layer_input=12, vocab_size_per_layer_input=128, num_kv_shared_layers=2,
                  attention_k_eq_v=False, initializer_range=0.05)
# Gemma4ForConditionalGeneration: tiny vision / audio towers beside the text model, soft-token ids inside the vocab
GEMMA4_VISION = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
                     initializer_range=0.1)
GEMMA4_AUDIO = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 8],
                    conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
                    output_proj_dims=36, initializer_range=0.1)
GEMMA4_TOKENS = dict(image_token_id=120, audio_token_id=121, video_token_id=122, boi_token_id=123, eoi_token_id=124,
                     boa_token_id=125, eoa_token_index=126)
# DeepSeek-V3: MLA (odd ranks and head dims), 1 dense layer then MoE with a shared expert, 2 groups of 2 experts
# (one chosen) under a sigmoid router; YaRN with mscale as published (factor 4 over 32 original positions)
DEEPSEEK_V3 = dict(vocab_size=256, hidden_size=64, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
                   v_head_dim=10, head_dim=8, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
                   moe_intermediate_size=24, num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=2.5, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                        mscale_all_dim=0.8, original_max_position_embeddings=32, beta_fast=32.0,
                                        beta_slow=1.0), tie_word_embeddings=False)
# Gemma 3: window 4 < sequence, two full layers of 5 (linear-scaled RoPE on them), softcapped logits
GEMMA3 = dict(vocab_size=256, hidden_size=48, intermediate_size=40, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20, sliding_window=4,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                           "full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
              final_logit_softcapping=30.0, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
              attn_implementation="eager")
CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig", "Gemma4ForCausalLM": "Gemma4TextConfig", "Gemma4ForConditionalGeneration": "Gemma4Config"}

FAMILIES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3_tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True}),
    "qwen3_moe_unnormed": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": False}),
    "qwen3_moe_mixed": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True, "num_hidden_layers": 4,
                                               "decoder_sparse_step": 2, "mlp_only_layers": [3]}),  # experts in layer 1
    "qwen2": ("Qwen2ForCausalLM", {"head_dim": 16, "intermediate_size": 88, "tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None, "tie_word_embeddings": False}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 40,
                                       "sliding_window": None, "tie_word_embeddings": False}),
    "deepseek_v3": ("DeepseekV3ForCausalLM", DEEPSEEK_V3),
    # q projected directly (q_lora_rank null), plain RoPE, 2 shared experts, no groups, tied embeddings
    "deepseek_v3_q_proj": ("DeepseekV3ForCausalLM", {
        **DEEPSEEK_V3, "q_lora_rank": None, "n_shared_experts": 2, "n_group": 1, "topk_group": 1,
        "num_hidden_layers": 2, "rope_parameters": dict(rope_type="default", rope_theta=500.0),
        "tie_word_embeddings": True}),
    # Phi-3: head_dim from hidden_size / heads (no head_dim field), RoPE on 3/4 of each head, window 5 < sequence
    "phi3": ("Phi3ForCausalLM", {"head_dim": None, "intermediate_size": 88, "tie_word_embeddings": False,
                                 "sliding_window": 5,
                                 "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.75}}),
    "gemma3": ("Gemma3ForCausalLM", GEMMA3),
    "gemma4_moe": ("Gemma4ForCausalLM", {**GEMMA4, **GEMMA4_MOE, "attention_k_eq_v": True}),
    "gemma4_dense": ("Gemma4ForCausalLM", {**GEMMA4, "attention_k_eq_v": True}),
    "gemma4_e2b": ("Gemma4ForCausalLM", GEMMA4_E2B),
    "gemma4_e4b": ("Gemma4ForCausalLM", GEMMA4_E4B),
    # the published layouts: 26B-A4B (MoE + K=V + vision), 31B (dense + K=V + vision), E2B / E4B (+ vision + audio)
    "gemma4_vlm": ("Gemma4ForConditionalGeneration", dict(
        GEMMA4_TOKENS, text_config={**GEMMA4, **GEMMA4_MOE, "attention_k_eq_v": True,
                                    "use_bidirectional_attention": "vision"},
        vision_config={**GEMMA4_VISION, "standardize": True}, audio_config=None)),
    "gemma4_vlm_dense": ("Gemma4ForConditionalGeneration", dict(
        GEMMA4_TOKENS, text_config={**GEMMA4, "attention_k_eq_v": True, "use_bidirectional_attention": "vision"},
        vision_config={**GEMMA4_VISION, "use_clipped_linears": True}, audio_config=None)),
    "gemma4_e2b_vlm": ("Gemma4ForConditionalGeneration", dict(
        GEMMA4_TOKENS, text_config=GEMMA4_E2B, vision_config=GEMMA4_VISION, audio_config=GEMMA4_AUDIO)),
    "gemma4_e4b_vlm": ("Gemma4ForConditionalGeneration", dict(
        GEMMA4_TOKENS, text_config={**GEMMA4_E4B, "use_bidirectional_attention": "vision"},
        vision_config=GEMMA4_VISION, audio_config=GEMMA4_AUDIO)),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-randomise every tensor that init leaves constant (norm weights, scales), so a swapped or unfilled
    tensor shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            flat = tensor.detach().flatten()
            if torch.all(flat == flat[0]):
                noise = torch.rand(tensor.shape, generator=gen) if flat[0] == 0 else \
                    torch.randn(tensor.shape, generator=gen)
                tensor.copy_(0.5 + 0.3 * noise if flat[0] == 0 else flat[0] * (1.0 + 0.3 * noise))
    return model


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny model of `family` (see FAMILIES)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    config_cls = getattr(transformers, CONFIG_CLASSES.get(cls_name, cls_name.replace("ForCausalLM", "Config")))
    defaults = {} if "text_config" in extra else TINY  # a multimodal config holds the text model's in text_config
    fields = {**defaults, **extra, **overrides}
    fields = {k: v for k, v in fields.items() if v is not None or k not in defaults}  # None drops a TINY field
    return config_cls(**fields, architectures=[cls_name])


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of `family` (see FAMILIES), fp32, eval mode, perturbed."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    return perturb(model, seed)


def run_demo(family: str = "qwen3_moe") -> dict:
    from .api import Converter
    from .verify import parity, roundtrip

    with tempfile.TemporaryDirectory(prefix="specbridge-demo-") as tmp:
        hf_dir = Path(tmp) / "hf"
        tiny_model(family).save_pretrained(str(hf_dir))
        start = time.perf_counter()
        conv = Converter.from_pretrained(hf_dir)
        plan = conv.check()
        trip = roundtrip(hf_dir)
        logits = parity(hf_dir)
        return {
            "family": family, "architecture": plan.architecture, "spec": plan.spec, "hf_format": plan.format,
            "mappings": len(plan.mappings), "coverage": "proved",
            "roundtrip": trip.summary(), "roundtrip_bit_exact": trip.exact,
            "parity": logits.summary(atol=1e-4), "parity_ok": logits.ok(atol=1e-4), "inputs": list(logits.modalities),
            "seconds": round(time.perf_counter() - start, 2),
        }
