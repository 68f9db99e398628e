"""The megatron-core Gemma 4 text decoder matches transformers' `Gemma4ForCausalLM` in fp32.

Weights are copied HF -> megatron by a hand-written 1:1 mapping (no folding), which also proves
coverage: every HF tensor is read once and every megatron parameter written once. Tiny dims are all
distinct; every weight HF initialises to 1 or 0 (norms, router scales, layer_scalar) is re-randomised.
"""

from __future__ import annotations

import pytest
import torch

from specbridge.runtime.parallel import destroy_parallel, init_parallel

transformers = pytest.importorskip("transformers")

from specbridge.api import Converter  # noqa: E402
from specbridge.runtime.models import build_model  # noqa: E402
from specbridge.runtime.models.gemma4_attention import rope_inv_freq  # noqa: E402

LAYER_TYPES = [
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=40,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    layer_types=LAYER_TYPES,
    sliding_window=4,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    attn_implementation="eager",
)
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24)
CASES = {
    "moe": dict(BASE, **MOE, attention_k_eq_v=False),
    "moe_k_eq_v": dict(BASE, **MOE, attention_k_eq_v=True),
    "dense_k_eq_v": dict(BASE, attention_k_eq_v=True),
}
SEQ, BATCH = 12, 2


@pytest.fixture(scope="module", autouse=True)
def parallel():
    init_parallel(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_parallel()


def hf_model(case: str):
    """A randomised fp32 HF Gemma4ForCausalLM; weights left at 1 or 0 by init are re-drawn."""
    torch.manual_seed(0)
    config = transformers.Gemma4TextConfig(**CASES[case])
    model = transformers.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(
                ("norm.weight", "layernorm.weight", "_1.weight", "_2.weight", "scale", "layer_scalar")
            ):
                tensor.uniform_(0.5, 1.5)
    return model


def qkv_weight(attn, kv_heads: int, head_dim: int) -> torch.Tensor:
    """megatron fused QKV [g * (r + 2) * d, H]: per KV group its r query heads, its K head, its V head."""
    hidden = attn.q_proj.weight.shape[1]
    q = attn.q_proj.weight.view(kv_heads, -1, hidden)
    k = attn.k_proj.weight.view(kv_heads, head_dim, hidden)
    v = k if attn.v_proj is None else attn.v_proj.weight.view(kv_heads, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def hf_to_mcore(hf) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{megatron name: (tensor, HF names read)} for the whole model (the mapping the spec must encode)."""
    cfg = hf.config
    out = {
        "embedding.word_embeddings.weight": (hf.model.embed_tokens.weight, ["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": (hf.model.norm.weight, ["model.norm.weight"]),
    }
    for i, layer in enumerate(hf.model.layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        geometry = cfg.per_layer_config[i]
        attn = layer.self_attn
        qkv_sources = [
            f"{hp}self_attn.{p}_proj.weight"
            for p in ("q", "k", "v")
            if getattr(attn, f"{p}_proj") is not None
        ]
        out[mp + "self_attention.linear_qkv.weight"] = (
            qkv_weight(attn, geometry.num_key_value_heads, geometry.head_dim),
            qkv_sources,
        )
        renames = {
            "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
            "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight": "pre_mlp_layernorm.weight",
            "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
            "layer_scalar": "layer_scalar",
        }
        dense = "mlp.shared_experts." if cfg.enable_moe_block else "mlp."
        renames["mlp.down_proj.weight"] = dense + "linear_fc2.weight"
        out[mp + dense + "linear_fc1.weight"] = (
            torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
            [hp + "mlp.gate_proj.weight", hp + "mlp.up_proj.weight"],
        )
        if cfg.enable_moe_block:
            renames.update(
                {
                    "router.proj.weight": "mlp.router.weight",
                    "router.scale": "mlp.router.scale",
                    "router.per_expert_scale": "mlp.router.per_expert_scale",
                    "post_feedforward_layernorm_1.weight": "mlp.post_shared_experts_layernorm.weight",
                    "pre_feedforward_layernorm_2.weight": "mlp.pre_experts_layernorm.weight",
                    "post_feedforward_layernorm_2.weight": "mlp.post_experts_layernorm.weight",
                }
            )
            for e in range(cfg.num_experts):
                expert = f"{mp}mlp.experts.local_experts.{e}."
                out[expert + "linear_fc1.weight"] = (
                    layer.experts.gate_up_proj[e],
                    [hp + "experts.gate_up_proj"],
                )
                out[expert + "linear_fc2.weight"] = (layer.experts.down_proj[e], [hp + "experts.down_proj"])
        hf_sd = dict(layer.named_parameters()) | dict(layer.named_buffers())
        for hf_name, mc_name in renames.items():
            out[mp + mc_name] = (hf_sd[hf_name], [hp + hf_name])
    return out


def load_into(mcore, hf) -> None:
    """Copy HF weights into `mcore`; assert both sides are covered exactly once."""
    mapping = hf_to_mcore(hf)
    params = dict(mcore.named_parameters())
    assert sorted(mapping) == sorted(params), set(mapping) ^ set(params)
    read = {name for _, sources in mapping.values() for name in sources}
    saved = set(hf.state_dict()) - {"lm_head.weight"}
    assert read == saved, read ^ saved
    with torch.no_grad():
        for name, (tensor, _) in mapping.items():
            assert params[name].shape == tensor.shape, (name, params[name].shape, tensor.shape)
            params[name].copy_(tensor)


def build(hf):
    """The Megatron model from the spec's config sections for `hf`'s config (the builder contract)."""
    plan = Converter.from_config(hf.config, architecture=type(hf).__name__).plan
    return build_model(plan.model, plan.transformer_kwargs(), plan.model_kwargs(), hf_config=hf.config)


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return ids, positions


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case):
    hf = hf_model(case)
    mcore = build(hf)
    load_into(mcore, hf)
    ids, positions = inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = mcore(ids, positions)
    assert got.shape == expected.shape == (BATCH, SEQ, BASE["vocab_size"])
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_sliding_window_matters():
    """A longer window changes HF's logits, so the test above does exercise the window."""
    hf = hf_model("dense_k_eq_v")
    ids, positions = inputs()
    wide = transformers.Gemma4ForCausalLM(
        transformers.Gemma4TextConfig(**dict(CASES["dense_k_eq_v"], sliding_window=SEQ))
    )
    wide.load_state_dict(hf.state_dict())
    with torch.no_grad():
        narrow_logits = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
        wide_logits = wide.eval()(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert (narrow_logits - wide_logits).abs().max() > 1e-3


def test_k_eq_v_reads_raw_k_not_v_rows():
    """On K=V layers the V rows of linear_qkv are never read: V is the raw K projection."""
    hf = hf_model("dense_k_eq_v")
    mcore = build(hf)
    load_into(mcore, hf)
    ids, positions = inputs()
    with torch.no_grad():
        before = mcore(ids, positions)
        qkv = mcore.decoder.layers[2].self_attention.linear_qkv.weight
        d, r = 32, 4
        qkv.view(1, (r + 2) * d, -1)[:, (r + 1) * d :].normal_()
        after = mcore(ids, positions)
    assert torch.equal(before, after)


def test_rope_inverse_frequencies_match_hf():
    hf = hf_model("moe")
    rotary = hf.model.rotary_emb
    for layer_type, head_dim in (("sliding_attention", 16), ("full_attention", 32)):
        ours = rope_inv_freq(hf.config.rope_parameters[layer_type], head_dim)
        assert torch.equal(ours, getattr(rotary, f"{layer_type}_inv_freq"))
    full = rope_inv_freq(hf.config.rope_parameters["full_attention"], 32)
    assert torch.count_nonzero(full) == 4  # partial 0.25 of 32 dims = 8 rotated dims = 4 frequencies


def test_parameter_names_and_shapes():
    mcore = build(hf_model("moe_k_eq_v"))
    shapes = {name: tuple(p.shape) for name, p in mcore.named_parameters()}
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == (2 * (2 + 2) * 16, 64)
    assert shapes["decoder.layers.2.self_attention.linear_qkv.weight"] == (1 * (4 + 2) * 32, 64)
    assert shapes["decoder.layers.2.self_attention.linear_proj.weight"] == (64, 4 * 32)
    assert shapes["decoder.layers.2.self_attention.k_layernorm.weight"] == (32,)
    assert shapes["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"] == (80, 64)
    assert shapes["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"] == (48, 64)
    assert shapes["decoder.layers.1.mlp.router.per_expert_scale"] == (4,)
    assert shapes["decoder.layers.4.layer_scalar"] == (1,)
    assert not mcore.decoder.layers[4].layer_scalar.requires_grad


@pytest.mark.parametrize(
    "override",
    [dict(use_bidirectional_attention="all"), dict(attention_bias=True)],
)
def test_unmodelled_features_are_refused_by_the_spec(override):
    """The spec's `requires:` is the one list of refusals: the builder keeps none of its own."""
    from specbridge.errors import SpecError

    config = transformers.Gemma4TextConfig(**dict(CASES["dense_k_eq_v"], **override))
    with pytest.raises(SpecError, match="not supported by the spec"):
        Converter.from_config(config, architecture="Gemma4ForCausalLM")
