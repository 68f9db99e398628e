"""`check` at real size proves coverage without allocating the model: the Megatron model for the manifest is
built on the meta device (as the HF one is). Real Gemma 4 26B-A4B and Qwen3-30B-A3B configs, no downloads."""

from __future__ import annotations

import pytest
import torch

import specbridge.api as api
from specbridge.api import Converter

# google/gemma-4-26B-A4B's text config (its released config.json values)
GEMMA4_26B_A4B = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True, enable_moe_block=True,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
    max_position_embeddings=262144, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, hidden_size_per_layer_input=0,
    num_kv_shared_layers=0, use_bidirectional_attention="vision", num_hidden_layers=30,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
    pad_token_id=0, eos_token_id=1, bos_token_id=2, architectures=["Gemma4ForCausalLM"], dtype="bfloat16",
)
# Qwen/Qwen3-30B-A3B's config
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, architectures=["Qwen3MoeForCausalLM"],
    dtype="bfloat16",
)


def real_config(name: str):
    from transformers import Gemma4TextConfig, Qwen3MoeConfig

    return Gemma4TextConfig(**GEMMA4_26B_A4B) if name == "gemma4" else Qwen3MoeConfig(**QWEN3_30B_A3B)


@pytest.mark.parametrize("name, billions", [("gemma4", 25), ("qwen3_moe", 30)])
def test_check_builds_nothing_in_memory(name, billions, parallel, monkeypatch):
    built = []
    original = api.build_chunks
    monkeypatch.setattr(api, "build_chunks", lambda *a, **k: built.extend(original(*a, **k)) or built)
    conv = Converter.from_config(real_config(name))
    plan = conv.check()
    assert plan.num_layers == real_config(name).num_hidden_layers and plan.num_experts == 128
    tensors = [t for chunk in built for t in (*chunk.parameters(), *chunk.buffers())]
    assert sum(t.numel() for t in tensors) > billions * 1e9  # the whole model was built ...
    assert {t.device.type for t in tensors} == {"meta"}       # ... and none of it materialised
