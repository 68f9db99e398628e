"""The published Gemma 4 configurations (as `Gemma4Config` keyword arguments), written from what is publicly known
of google/gemma-4-{E2B,E4B,26B-A4B,31B} (transformers' configuration defaults and docs, model cards; nothing
downloaded). Geometry only: used to prove coverage at real size on the meta device."""

from __future__ import annotations

VOCAB = 262_144
TOKENS = dict(image_token_id=258_880, audio_token_id=258_881, video_token_id=258_884, boi_token_id=255_999,
              eoi_token_id=258_882, boa_token_id=256_000, eoa_token_index=258_883)
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}


def _layer_types(n: int, period: int) -> list[str]:
    """`period - 1` sliding layers, then one full layer, repeated; the last layer is full."""
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def _text(**fields) -> dict:
    base = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, head_dim=256, global_head_dim=512,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
                final_logit_softcapping=30.0, rope_parameters=ROPE, tie_word_embeddings=True)
    return {**base, **fields}


# SigLIP-style towers: the small one of E2B/E4B (transformers' defaults) and the large one of 26B-A4B / 31B
VISION_SMALL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                    position_embedding_size=10_240, use_clipped_linears=True)
VISION_LARGE = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                    position_embedding_size=10_240, standardize=True)
AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, output_proj_dims=1536)

PUBLISHED = {
    "E2B": dict(TOKENS, text_config=_text(
        hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
        layer_types=_layer_types(35, 5), sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=20, use_double_wide_mlp=True),
        vision_config=VISION_SMALL, audio_config=AUDIO),
    "E4B": dict(TOKENS, text_config=_text(
        hidden_size=2560, intermediate_size=10_240, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
        layer_types=_layer_types(42, 6), sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=18),
        vision_config=VISION_SMALL, audio_config=AUDIO),
    "26B-A4B": dict(TOKENS, text_config=_text(
        hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, attention_k_eq_v=True, layer_types=_layer_types(30, 6), sliding_window=1024,
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, use_bidirectional_attention="vision", max_position_embeddings=262_144),
        vision_config=VISION_LARGE, audio_config=None),
    "31B": dict(TOKENS, text_config=_text(
        hidden_size=5376, intermediate_size=21_504, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
        layer_types=_layer_types(60, 6), sliding_window=1024, hidden_size_per_layer_input=0,
        use_bidirectional_attention="vision", max_position_embeddings=262_144),
        vision_config=VISION_LARGE, audio_config=None),
}
