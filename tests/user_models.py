"""Models built the way a user builds them: megatron-core's own `GPTModel` and layer/block spec functions, from
the converter's `megatron_config()`, never specbridge's builder."""

from __future__ import annotations


def megatron_spec(config, te: bool = False, grouped: bool = False):
    """megatron-core's layer spec for `config` (the decoder block spec when MoE layers alternate with dense ones):
    local or TransformerEngine, SequentialMLP or grouped experts."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if config.num_moe_experts and isinstance(config.moe_layer_freq, list):
        return specs.get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=config.normalization)
    if te:
        return specs.get_gpt_layer_with_transformer_engine_spec(config.num_moe_experts, moe_grouped_gemm=grouped,
                                                                qk_layernorm=config.qk_layernorm)
    return specs.get_gpt_layer_local_spec(config.num_moe_experts, moe_grouped_gemm=grouped,
                                          qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def user_model(conv, te: bool = False, grouped: bool = False, params_dtype=None):
    """One chunk (no pipeline split) of the converter's model, built by megatron-core's own functions."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel

    config, model_args = conv.megatron_config(params_dtype=params_dtype)
    if grouped:
        config = dataclasses.replace(config, moe_grouped_gemm=True)
    return GPTModel(config=config, transformer_layer_spec=megatron_spec(config, te, grouped), **model_args).eval()
