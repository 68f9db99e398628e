"""Gemma 4 text decoder (transformers `Gemma4ForCausalLM`) built from megatron-core parts.

Contract: `build_gemma4(transformer, model, hf_config=...)` answers a `Gemma4Model` (a `GPTModel`) for
this rank's place in the parallel layout (parallel state must be initialised) whose forward
`model(input_ids, position_ids, attention_mask=None)` returns logits [b, s, V] equal to HF's
`Gemma4ForCausalLM` logits given the same weights. Every HF tensor maps to exactly one megatron
parameter (see `notes_gemma4.md` / the test's mapping); no weight is folded into another.

Modules: gemma4_config (TransformerConfig + HF-derived kwargs), gemma4_attention (norm, RoPE,
attention), gemma4_moe (router, MoE block), gemma4_layer (layer, specs), gemma4_model (GPTModel).
This module imports megatron-core only when a model is built.
"""

from __future__ import annotations

from specbridge.runtime import cpu_compat


def _text_config(hf_config):
    """The text config of a Gemma4TextConfig or of a multimodal Gemma4Config."""
    if getattr(hf_config, "model_type", None) == "gemma4":
        return hf_config.get_text_config()
    return hf_config


def build_gemma4(
    transformer: dict,
    model: dict,
    *,
    hf_config,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """Build this rank's Gemma 4 text model chunk (eval mode) from a transformers Gemma 4 config.

    `hf_config` (keyword, as `models.build_model` passes it for names in `NEEDS_HF_CONFIG`): a
    `Gemma4TextConfig` (or a `Gemma4Config`, whose text config is used).
    `transformer`: TransformerConfig kwargs overriding the ones derived from `hf_config` by
    `gemma4_config.transformer_kwargs` (architecture) and from parallel_state (tensor / pipeline /
    expert / expert-tensor / virtual-pipeline sizes). The caller typically passes only dtypes
    (`params_dtype`, `bf16`), uneven-pipeline keys, `moe_token_dispatcher_type`, recompute settings.
    `model`: GPTModel kwargs overriding `gemma4_config.model_kwargs` (vocab_size, max_sequence_length,
    share_embeddings_and_output_weights from tie_word_embeddings; parallel_output, ...).
    Raises NotImplementedError for per-layer embeddings, KV sharing and the other features
    `gemma4_config.check_supported` names.
    """
    cpu_compat.apply()
    from specbridge.runtime.models.gemma4_config import (
        Gemma4TransformerConfig,
        model_kwargs,
        transformer_kwargs,
    )
    from specbridge.runtime.models.gemma4_layer import gemma4_block_spec
    from specbridge.runtime.models.gemma4_model import Gemma4Model
    from specbridge.runtime.models.gpt import transformer_config
    from specbridge.runtime.parallel import transformer_fields

    hf_config = _text_config(hf_config)
    kwargs = {**transformer_kwargs(hf_config), **transformer_fields(), **transformer}
    config = transformer_config(kwargs, Gemma4TransformerConfig)
    gemma = Gemma4Model(
        config=config,
        transformer_layer_spec=gemma4_block_spec(config, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **{**model_kwargs(hf_config), **model},
    )
    return gemma.eval()
