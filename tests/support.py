"""Tiny random HF checkpoints for the tests, built with transformers' own classes.

All dims are distinct (head_dim != hidden / heads), and every weight that init leaves at a constant (norms)
is re-randomised, so that a swapped or untouched tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            intermediate_size=96, num_hidden_layers=3, max_position_embeddings=128, rms_norm_eps=1e-5,
            initializer_range=0.1)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)

FAMILIES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3_tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True}),
    "qwen3_moe_unnormed": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": False}),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-randomise every tensor init leaves constant (norm weights, scales) away from its constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            flat = tensor.detach().flatten()
            if torch.all(flat == flat[0]):
                tensor.copy_(flat[0] + 0.5 + 0.3 * torch.rand(tensor.shape, generator=gen) if flat[0] == 0
                             else flat[0] * (1.0 + 0.3 * torch.randn(tensor.shape, generator=gen)))
    return model


def tiny_model(family: str, seed: int = 0, **overrides):
    cls_name, extra = FAMILIES[family]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**{**TINY, **extra, **overrides}, architectures=[cls_name])
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).float().eval()
    return perturb(model, seed)


def save_tiny(family: str, directory: Path, max_shard_size: str | None = None, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory
