"""The benchmarked model: the real `google/gemma-4-26B-A4B` text geometry with N decoder layers, its config and
the list of every tensor of its checkpoint (proved equal to transformers' Gemma4ForCausalLM)."""

from __future__ import annotations

# google/gemma-4-26B-A4B text config (values of the released config.json); only num_hidden_layers differs
GEMMA4_26B_A4B = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    sliding_window=1024, max_position_embeddings=262144, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, hidden_size_per_layer_input=0,
    num_kv_shared_layers=0, use_bidirectional_attention="vision",
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
FULL_LAYERS = 30


def layer_types(n: int) -> list[str]:
    """26B-A4B pattern (every 6th layer full); for a short model the last layer is full, as transformers
    forces: 1 layer = [full], 2 layers = [sliding, full]."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def make_config(layers: int):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**GEMMA4_26B_A4B, num_hidden_layers=layers, layer_types=layer_types(layers),
                            architectures=["Gemma4ForCausalLM"], dtype="bfloat16")


def tensor_list(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a Gemma4ForCausalLM checkpoint of `cfg` holds, written from the geometry (not read off the
    model); `check_against_transformers` proves it equal to the real class's state dict."""
    h, heads, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        full = kind == "full_attention"
        g = GEMMA4_26B_A4B  # the full layers' geometry is not an attribute: transformers folds it into per_layer_config
        d = g["global_head_dim"] if full else g["head_dim"]
        kv = g["num_global_key_value_heads"] if full else g["num_key_value_heads"]
        out += [(p + "layer_scalar", (1,)),
                (p + "self_attn.q_proj.weight", (heads * d, h)),
                (p + "self_attn.q_norm.weight", (d,)),
                (p + "self_attn.k_norm.weight", (d,)),
                (p + "self_attn.k_proj.weight", (kv * d, h))]
        if not (full and cfg.attention_k_eq_v):
            out.append((p + "self_attn.v_proj.weight", (kv * d, h)))
        f = cfg.intermediate_size
        out += [(p + "self_attn.o_proj.weight", (h, heads * d)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
        out += [(p + n, (h,)) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                        "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")]
        m = cfg.moe_intermediate_size
        out += [(p + "router.scale", (h,)), (p + "router.per_expert_scale", (e,)), (p + "router.proj.weight", (e, h)),
                (p + "experts.gate_up_proj", (e, 2 * m, h)), (p + "experts.down_proj", (e, h, m))]
        out += [(p + n, (h,)) for n in ("post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_2.weight",
                                        "pre_feedforward_layernorm_2.weight")]
    out.append(("model.norm.weight", (h,)))
    return out


def check_against_transformers(cfg, tensors) -> int:
    """The generated key set and shapes equal Gemma4ForCausalLM's state dict (meta device) minus tied keys."""
    import torch
    from transformers import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if cfg.tie_word_embeddings else set()
    expected = {k: s for k, s in state.items() if k not in tied}
    got = dict(tensors)
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise SystemExit(f"generated tensors differ from transformers: missing {missing[:5]}, extra {extra[:5]}, "
                         f"wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}")
    return len(expected)



def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
