"""Gemma 4 (transformers `Gemma4ForCausalLM` / `Gemma4ForConditionalGeneration`) built from megatron-core parts.

Contract (the builder contract of `runtime.models`): `build_gemma4(transformer, model, *, hf_config, pre_process,
post_process, vp_stage)` answers this rank's `Gemma4Model` chunk (a `GPTModel`; parallel state must be
initialised) whose forward `model(input_ids, position_ids, attention_mask=None, **modalities)` returns logits
[b, s, V] equal to transformers' given the same weights. `transformer` is the spec's `mcore.transformer` section
(every per-layer fact: geometry, FFN width, KV sharing, RoPE, window, PLE width) plus the caller's overrides;
`model` the spec's `mcore.model_args`. `hf_config` is read only for what transformers owns as whole modules: a
multimodal `Gemma4Config` gives the vision / audio towers (transformers' own classes, first pipeline stage,
replicated across TP) and the token ids their soft tokens replace. Every HF tensor maps to exactly one megatron
tensor (see specs/gemma4.yaml); no weight is folded into another. Gemma 3 text (specs/gemma3.yaml) is built by
the same function with three options of the config (`norm_unit_offset`, `value_norm`, `layer_scalar`).

Modules: gemma4_config (TransformerConfig with per-layer lists), gemma4_attention (norm, RoPE, attention, KV
sharing), gemma4_moe (router, MoE block), gemma4_layer (layer, specs), gemma4_model (GPTModel: embeddings, PLE,
masks, pipeline carry), gemma4_towers (vision / audio towers and their soft tokens). megatron-core is imported
only when a model is built.
"""

from __future__ import annotations

from specbridge.runtime import cpu_compat


def build_gemma4(
    transformer: dict,
    model: dict,
    *,
    hf_config=None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """Build this rank's Gemma 4 model chunk (eval mode); see the module docstring."""
    cpu_compat.apply()
    from specbridge.runtime.models.gemma4_config import Gemma4TransformerConfig, per_layer_checkpoint_keys
    from specbridge.runtime.models.gemma4_layer import gemma4_block_spec
    from specbridge.runtime.models.gemma4_model import Gemma4Model, needs_pipeline_carry
    from specbridge.runtime.models.gemma4_towers import multimodal_parts
    from specbridge.runtime.models.gpt import transformer_config, transformer_config_kwargs

    kwargs = transformer_config_kwargs({**per_layer_checkpoint_keys(), **transformer})
    if kwargs.get("pipeline_model_parallel_size", 1) > 1 and needs_pipeline_carry(kwargs):
        # later stages receive the shared K/V and per-layer inputs beside the hidden state: the tensor sent between
        # stages is wider than hidden_size, so the schedule must exchange shapes (megatron-core's own mechanism)
        kwargs["variable_seq_lengths"] = True
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall")  # megatron-core refuses allgather with it
    config = transformer_config(kwargs, Gemma4TransformerConfig)
    gemma = Gemma4Model(
        config=config,
        transformer_layer_spec=gemma4_block_spec(config, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        multimodal=multimodal_parts(hf_config, config, build_towers=pre_process),
        **model,
    )
    return gemma.eval()
