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
CONFIG_CLASSES = {"Gemma4ForCausalLM": "Gemma4TextConfig"}

FAMILIES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3_tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True}),
    "qwen3_moe_unnormed": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": False}),
    "gemma4_moe": ("Gemma4ForCausalLM", {**GEMMA4, **GEMMA4_MOE, "attention_k_eq_v": True}),
    "gemma4_dense": ("Gemma4ForCausalLM", {**GEMMA4, "attention_k_eq_v": True}),
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


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of `family` (see FAMILIES), fp32, eval mode, perturbed."""
    import transformers

    cls_name, extra = FAMILIES[family]
    config_cls = getattr(transformers, CONFIG_CLASSES.get(cls_name, cls_name.replace("ForCausalLM", "Config")))
    config = config_cls(**{**TINY, **extra, **overrides}, architectures=[cls_name])
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).float().eval()
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
            "parity": logits.summary(atol=1e-4), "parity_ok": logits.ok(atol=1e-4),
            "seconds": round(time.perf_counter() - start, 2),
        }
