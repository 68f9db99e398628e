"""Stock megatron-core GPTModel (local spec, CPU, fp32) matches transformers' forward.

Weights are copied HF -> megatron by hand here, independently of any spec, so that this test pins
down the TransformerConfig / GPTModel kwargs and the tensor layouts that the specs must encode.
Tiny dims are all distinct (head_dim != hidden / heads) and norm weights are perturbed away from 1.
"""

from __future__ import annotations

import pytest
import torch

from specbridge.runtime.models import build_model
from specbridge.runtime.parallel import destroy_parallel, init_parallel

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    intermediate_size=96,
    num_hidden_layers=3,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    initializer_range=0.1,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)


@pytest.fixture(scope="module", autouse=True)
def parallel():
    init_parallel(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_parallel()


def transformer_kwargs(cfg) -> dict:
    """TransformerConfig kwargs for an HF Llama / Qwen3 / Qwen3-MoE config."""
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=cfg.hidden_act,
        add_bias_linear=False,
        add_qkv_bias=cfg.attention_bias,
        qk_layernorm=cfg.model_type in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if cfg.model_type == "qwen3_moe":
        kwargs.update(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            moe_router_dtype="fp32",
            moe_expert_capacity_factor=None,
        )
    return kwargs


def model_kwargs(cfg) -> dict:
    """GPTModel kwargs for an HF Llama / Qwen3 / Qwen3-MoE config."""
    return dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_parameters["rope_theta"],
        rotary_percent=1.0,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
    )


def tiny_hf(cls_name: str, **overrides):
    """A tiny random HF causal LM in fp32, eval mode, with norm weights perturbed away from 1."""
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = config_cls(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model


def qkv(attn, cfg) -> torch.Tensor:
    """Megatron linear_qkv: per query group, its query heads, then its K head, then its V head."""
    g, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    q = attn.q_proj.weight.view(g, -1, d, h)
    k = attn.k_proj.weight.view(g, 1, d, h)
    v = attn.v_proj.weight.view(g, 1, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def layer_hf2mcore(layer, cfg) -> dict[str, torch.Tensor]:
    """Megatron tensors of one decoder layer, keyed by name relative to `decoder.layers.{i}.`."""
    attn = layer.self_attn
    out = {
        "input_layernorm.weight": layer.input_layernorm.weight,
        "self_attention.linear_qkv.weight": qkv(attn, cfg),
        "self_attention.linear_proj.weight": attn.o_proj.weight,
        "pre_mlp_layernorm.weight": layer.post_attention_layernorm.weight,
    }
    if hasattr(attn, "q_norm"):
        out["self_attention.q_layernorm.weight"] = attn.q_norm.weight
        out["self_attention.k_layernorm.weight"] = attn.k_norm.weight
    out.update(mlp_hf2mcore(layer.mlp))
    return out


def mlp_hf2mcore(mlp) -> dict[str, torch.Tensor]:
    """Dense GLU: fc1 = cat(gate, up). MoE: router + per-expert fc1 (gate rows first) / fc2."""
    if not hasattr(mlp, "experts"):
        fc1 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        return {"mlp.linear_fc1.weight": fc1, "mlp.linear_fc2.weight": mlp.down_proj.weight}
    out = {"mlp.router.weight": mlp.gate.weight}
    for e in range(mlp.experts.gate_up_proj.shape[0]):
        prefix = f"mlp.experts.local_experts.{e}."
        out[prefix + "linear_fc1.weight"] = mlp.experts.gate_up_proj[e]
        out[prefix + "linear_fc2.weight"] = mlp.experts.down_proj[e]
    return out


def hf2mcore(hf) -> dict[str, torch.Tensor]:
    """The full megatron state (parameters only) for an HF Llama / Qwen3 / Qwen3-MoE model."""
    cfg, body = hf.config, hf.model
    out = {
        "embedding.word_embeddings.weight": body.embed_tokens.weight,
        "decoder.final_layernorm.weight": body.norm.weight,
    }
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = hf.lm_head.weight
    for i, layer in enumerate(body.layers):
        out.update({f"decoder.layers.{i}.{k}": v for k, v in layer_hf2mcore(layer, cfg).items()})
    return out


def load_into(mcore, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into mcore's parameters; every parameter must be covered exactly."""
    params = dict(mcore.named_parameters())
    assert set(params) == set(tensors), set(params) ^ set(tensors)
    with torch.no_grad():
        for name, tensor in tensors.items():
            assert params[name].shape == tensor.shape, name
            params[name].copy_(tensor)


def mcore_logits(mcore, ids: torch.Tensor) -> torch.Tensor:
    """Megatron logits [b, s, V] for token ids [b, s], causal mask built by megatron-core."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return mcore(ids, positions, None)


CASES = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3-tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe-norm_topk": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True}),
    "qwen3_moe-no_norm_topk": ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpt_matches_hf(case: str) -> None:
    cls_name, overrides = CASES[case]
    hf = tiny_hf(cls_name, **overrides)
    mcore = build_model("gpt", transformer_kwargs(hf.config), model_kwargs(hf.config))
    load_into(mcore, hf2mcore(hf))
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = mcore_logits(mcore, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
