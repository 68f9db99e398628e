"""The spec families beyond the generic proofs of test_roundtrip_parity (coverage, bit-exact round trip and fp32
logit parity of every family in `FAMILIES`, at TP1, as save_pretrained writes them) and of the multi-rank
harness (one layout each): what is particular to a family — a RoPE scaling, a second on-disk layout, the configs
a spec refuses."""

from __future__ import annotations

import pytest
import torch

from specbridge.api import Converter
from specbridge.errors import SpecError
from specbridge.verify import parity, roundtrip
from tests.support import FAMILIES, tiny_model

LONG = 16384  # max_position_embeddings above Llama 3's original 8192
ROPE = {
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
}

YARN = FAMILIES["deepseek_v3"][1]["rope_parameters"]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rope_type", sorted(ROPE))
def test_llama_rope_scaling_parity(rope_type, tmp_path, parallel):
    """At 48 tokens the scaling moves transformers' logits by far more than the tolerance (so the parity below
    cannot pass with the scaling dropped), and the converted model matches the scaled logits."""
    scaled = tiny_model("llama", rope_parameters=ROPE[rope_type], max_position_embeddings=LONG)
    plain = tiny_model("llama", max_position_embeddings=LONG)
    assert all(torch.equal(a, b) for a, b in zip(scaled.state_dict().values(), plain.state_dict().values()))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(scaled, ids) - hf_logits(plain, ids)).abs().max() > 1e-2

    scaled.save_pretrained(str(tmp_path))
    conv = Converter.from_pretrained(tmp_path)
    model_args = conv.plan.model_kwargs()
    assert model_args["rope_scaling"] == (rope_type == "llama3")
    assert model_args["seq_len_interpolation_factor"] == (4.0 if rope_type == "linear" else 1.0)
    result = parity(tmp_path, seq_len=48)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0, result


def test_mistral_sliding_window_parity(tmp_path, parallel):
    """A window shorter than the sequence moves transformers' logits by far more than the tolerance, and the
    converted model (megatron-core's window_size) matches them."""
    windowed = tiny_model("mistral", sliding_window=5)
    plain = tiny_model("mistral")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(windowed, ids) - hf_logits(plain, ids)).abs().max() > 1e-2
    windowed.save_pretrained(str(tmp_path))
    assert Converter.from_pretrained(tmp_path).plan.transformer_kwargs()["window_size"] == [4, 0]
    assert roundtrip(tmp_path).exact
    result = parity(tmp_path, seq_len=24)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0, result


@pytest.mark.parametrize("family, overrides, field", [
    ("llama", {"rope_parameters": {**ROPE["llama3"], "low_freq_factor": 2.0}}, "low_freq_factor"),
    ("llama", {"rope_parameters": {**ROPE["llama3"], "high_freq_factor": 8.0}}, "high_freq_factor"),
    ("llama", {"rope_parameters": {**ROPE["llama3"], "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("deepseek_v3", {"topk_group": 2}, "topk_group"),  # groups ranked by their top-1 in megatron-core, top-2 in HF
    ("deepseek_v3", {"rope_parameters": {**YARN, "truncate": False}}, "truncate"),
    ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 0.0}}, "mscale"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
              "original_max_position_embeddings": 4096}, "rope_type"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}}},
     "full_attention"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6,
                                                       "partial_rotary_factor": 0.5}}}, "partial_rotary_factor"),
])
def test_unsupported_configs_are_refused_naming_the_field(family, overrides, field):
    config = tiny_model(family, max_position_embeddings=LONG, **overrides).config
    with pytest.raises(SpecError, match="not supported by the spec") as info:
        Converter.from_config(config)
    (diagnostic,) = info.value.diagnostics
    assert field in info.value.sources[diagnostic.span.file].splitlines()[diagnostic.span.line - 1]


@pytest.mark.parametrize("family, saved_expert", [
    ("mixtral", ".block_sparse_moe.experts.3.w3."),  # w1 gate, w3 up, w2 down
    ("deepseek_v3", ".mlp.experts.3.up_proj."),
])
def test_moe_both_on_disk_formats(family, saved_expert, tmp_path, parallel):
    """Checkpoints (and save_pretrained) hold the experts per expert (Mixtral's under block_sparse_moe),
    transformers fused under mlp: a checkpoint in the fused layout converts too, and export writes either layout."""
    from safetensors.torch import save_file

    from specbridge.runtime.safetensors_io import CheckpointReader

    model = tiny_model(family)
    model.save_pretrained(str(tmp_path / "per_expert"))
    saved = CheckpointReader(tmp_path / "per_expert")
    assert any(saved_expert in k for k in saved.keys())
    (tmp_path / "fused").mkdir()
    model.config.save_pretrained(str(tmp_path / "fused"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})

    conv = Converter.from_pretrained(tmp_path / "fused")
    assert conv.plan.format == "fused"
    conv.check()
    assert roundtrip(tmp_path / "fused").exact
    assert parity(tmp_path / "fused", seq_len=12).ok(atol=1e-4)

    chunks = conv.build_model()
    conv.import_weights(chunks, tmp_path / "fused")
    conv.with_format("per_expert").export_weights(chunks, tmp_path / "as_saved")
    written = CheckpointReader(tmp_path / "as_saved")
    assert written.keys() == saved.keys() and all(torch.equal(written.get(k), saved.get(k)) for k in saved.keys())


def test_deepseek_v3_mtp_layer_is_refused_naming_it(tmp_path, parallel):
    """The published DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last decoder layer
    (model.layers.{num_hidden_layers}.*), which transformers' model does not have (it drops it on load): specbridge
    does not convert it, and a checkpoint holding it is refused, naming one of its tensors, before anything is read."""
    from safetensors.torch import load_file, save_file

    from specbridge.errors import ConversionError

    model = tiny_model("deepseek_v3")
    model.save_pretrained(str(tmp_path))
    hidden, mtp = model.config.hidden_size, f"model.layers.{model.config.num_hidden_layers}"
    state = load_file(str(tmp_path / "model.safetensors"))
    state.update({f"{mtp}.enorm.weight": torch.ones(hidden), f"{mtp}.hnorm.weight": torch.ones(hidden),
                  f"{mtp}.eh_proj.weight": torch.zeros(hidden, 2 * hidden)})
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    conv = Converter.from_pretrained(tmp_path)
    chunks = conv.build_model()
    with pytest.raises(ConversionError, match=rf"tensor '{mtp}\.\w+\.weight' and 2 more, which no rule"):
        conv.import_weights(chunks, tmp_path)


# DeepSeek-V3 as published (config.json of deepseek-ai/DeepSeek-V3, without its FP8 quantization_config)
DEEPSEEK_V3_PUBLISHED = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_nextn_predict_layers=1, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
    n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, hidden_act="silu", max_position_embeddings=163840, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000, attention_bias=False, attention_dropout=0.0,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"})


def test_deepseek_v3_published_coverage_and_megatron_lm_args(parallel):
    """The published geometry (61 layers, 3 dense, 58 x 256 routed experts) has its coverage proved on the meta
    device, no weights allocated; the Megatron-LM arguments of its checkpoint carry MLA, YaRN and the router."""
    import transformers

    from specbridge.runtime.mcore_checkpoint import megatron_args

    config = transformers.DeepseekV3Config(**DEEPSEEK_V3_PUBLISHED, architectures=["DeepseekV3ForCausalLM"])
    conv = Converter.from_config(config).with_format("per_expert")
    with torch.device("meta"):
        chunks = conv.build_model(params_dtype=torch.bfloat16)
    plan = conv.check(chunks)
    hf, mcore = conv.manifests(chunks)
    # per layer: 2 norms + 7 MLA tensors; dense MLP 2; MoE: router, its bias, shared fc1/fc2, 256 x (fc1, fc2)
    assert len(plan.mappings) == len(mcore.tensors) == 61 * 9 + 3 * 2 + 58 * (4 + 256 * 2) + 3
    assert len(hf.tensors) == len(plan.mappings) + 3 + 58 * (1 + 256)  # each fc1 is two HF tensors, gate and up
    args = vars(megatron_args(chunks[0].config, conv.plan.model_kwargs()))
    assert {k: args[k] for k in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                                 "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor",
                                 "mscale", "mscale_all_dim", "rotary_base", "moe_router_enable_expert_bias",
                                 "moe_router_num_groups", "moe_router_group_topk",
                                 "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size")} == {
        "multi_latent_attention": True, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128,
        "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "rope_type": "yarn", "rotary_scaling_factor": 40,
        "mscale": 1.0, "mscale_all_dim": 1.0, "rotary_base": 10000, "moe_router_enable_expert_bias": True,
        "moe_router_num_groups": 8, "moe_router_group_topk": 4, "moe_router_topk_scaling_factor": 2.5,
        "moe_shared_expert_intermediate_size": 2048}


def test_gemma3_multimodal_class_is_not_served():
    """Gemma3ForConditionalGeneration (the published 4B/12B/27B class) carries a SigLIP tower the Gemma decoder does
    not run: it is refused as a whole, in one line, rather than converted without its vision tower."""
    import transformers

    from specbridge.demo import GEMMA3
    from specbridge.errors import UsageError

    text = {k: v for k, v in GEMMA3.items() if k != "attn_implementation"}
    config = transformers.Gemma3Config(text_config=text, architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(UsageError, match="no built-in spec serves architecture 'Gemma3ForConditionalGeneration'"):
        Converter.from_config(config)
