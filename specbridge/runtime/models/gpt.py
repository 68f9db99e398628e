"""Stock megatron-core GPTModel builder (Llama, Qwen3, Qwen3-MoE, DeepSeek-V3, ...), local layer spec.

Contract: `build_gpt(transformer, model)` takes a dict of `TransformerConfig` keyword arguments and a
dict of `GPTModel` keyword arguments (plain data, e.g. from a spec's config mapping) and answers a
`GPTModel` for this rank's place in the parallel layout (parallel state must be initialised; parallel sizes
not given come from `parallel.transformer_fields()`; a field TransformerConfig lacks raises `UnknownConfigField`;
`multi_latent_attention: true` selects megatron-core's `MLATransformerConfig` and its MLA attention). It
uses megatron-core's *local* layer spec (torch norms, no TransformerEngine/apex), SequentialMLP experts, every
parameter in `params_dtype` (fp32 unless given; the norms too, see `_in_params_dtype`), and CPU initialisation.
`cpu_compat.apply()` is run first (its CPU patches only without a GPU), and without a GPU every fusion flag that
needs CUDA kernels is forced off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from specbridge.runtime import cpu_compat

_ACTIVATIONS: dict[str, Callable] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

_CPU_OFF_FLAGS = (
    "masked_softmax_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
    "moe_permute_fusion",
    "moe_router_fusion",
    "cross_entropy_loss_fusion",
    "sequence_parallel",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def activation(name_or_fn: str | Callable) -> Callable:
    """Map an HF `hidden_act` name to the torch function; callables pass through."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name_or_fn!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name_or_fn]


def _dtype(value: str | torch.dtype) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16", "torch.bfloat16")."""
    if isinstance(value, torch.dtype):
        return value
    return _DTYPES[value.removeprefix("torch.")]


def transformer_config_kwargs(transformer: dict) -> dict:
    """The TransformerConfig kwargs actually used: names resolved, parallel sizes from the current topology
    (unless given), CPU-required flags applied."""
    from specbridge.runtime.parallel import transformer_fields

    kwargs = {**transformer_fields(), **transformer}
    kwargs["activation_func"] = activation(kwargs.get("activation_func", "gelu"))
    kwargs["params_dtype"] = _dtype(kwargs.get("params_dtype", torch.float32))
    kwargs["pipeline_dtype"] = _dtype(kwargs.get("pipeline_dtype", kwargs["params_dtype"]))
    kwargs.setdefault("use_cpu_initialization", True)
    if not torch.cuda.is_available():
        kwargs.update({flag: False for flag in _CPU_OFF_FLAGS})
        kwargs["use_cpu_initialization"] = True
    return kwargs


class UnknownConfigField(TypeError):
    """TransformerConfig kwargs that the config class has no field for (`fields`, sorted)."""

    def __init__(self, fields: list[str], config_class: type):
        self.fields, self.config_class = fields, config_class
        super().__init__(f"{config_class.__name__} has no field {', '.join(map(repr, fields))}")


def transformer_config(transformer: dict, config_class=None):
    """A megatron-core `TransformerConfig` (or `config_class`, a subclass of it) from plain kwargs, by
    `transformer_config_kwargs`; a kwarg the class has no field for raises `UnknownConfigField`."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    if config_class is None and transformer.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig as config_class
    config_class = config_class or TransformerConfig
    kwargs = transformer_config_kwargs(transformer)
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(config_class) if f.init})
    if unknown:
        raise UnknownConfigField(unknown, config_class)
    return config_class(**kwargs)


def layer_spec(config, vp_stage: int | None = None):
    """megatron-core's local GPT layer spec for `config` (dense or MoE, optional qk-norm, MLA); with a per-layer MoE
    pattern (`moe_layer_freq` a list of 0/1), megatron-core's block spec for this pipeline stage."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if config.num_moe_experts and isinstance(config.moe_layer_freq, list):
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                          vp_stage=vp_stage)
        layers = spec.layer_specs
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=False,
            qk_layernorm=config.qk_layernorm,
            multi_latent_attention=config.multi_latent_attention,
            normalization=config.normalization,
        )
        layers = [spec]
    if config.multi_latent_attention:
        from megatron.core.transformer.identity_op import IdentityOp

        for layer in layers:
            attention = layer.submodules.self_attention
            attention.submodules.core_attention = latent_dot_product_attention()
            if config.q_lora_rank is None:  # q projected directly: no q norm
                attention.module = direct_q_self_attention()
                attention.submodules.q_layernorm = IdentityOp
    return spec


@functools.cache
def direct_q_self_attention() -> type:
    """megatron-core's `MLASelfAttention` for a q projected directly from the hidden states (`q_lora_rank` None)
    with a kv norm, as DeepSeek-V3 has it: megatron-core 0.19 resolves that q projection to a fused norm + linear
    whenever `qk_layernorm` is set (a norm transformers does not have), so the spec's plain linear is kept."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class DirectQSelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):  # megatron-core >= 0.19 only
            return {**super()._resolve_qk_norm_config(submodules), "linear_q_proj": submodules.linear_q_proj}

    return DirectQSelfAttention


@functools.cache
def latent_dot_product_attention() -> type:
    """The local attention class for MLA, defined on first use (megatron-core is imported only to build)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        """megatron-core's local (unfused, torch) attention for multi-latent attention, whose query/key heads
        (`k_channels`) and value heads (`v_channels`) differ in width. MLA passes both widths, which only
        TransformerEngine's attention accepts; the local attention's arithmetic already takes any key width (its
        views infer it) and needs only the value width for its output."""

        def __init__(self, config, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            super().__init__(config, *args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_attention_head = v_channels
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return LatentDotProductAttention


def build_gpt(
    transformer: dict,
    model: dict,
    *,
    hf_config=None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """Build a megatron-core GPTModel from TransformerConfig kwargs and GPTModel kwargs (`hf_config` unused:
    the spec's config sections say everything).

    `transformer` may give `activation_func` as a name ("silu", "gelu") and `params_dtype` as a name.
    `model` holds GPTModel kwargs (vocab_size, max_sequence_length, position_embedding_type,
    rotary_base, share_embeddings_and_output_weights, ...). `pre_process`/`post_process`/`vp_stage`
    place the model in the pipeline. Answers the model in eval mode.
    """
    cpu_compat.apply()
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(transformer)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **model,
    )
    _in_params_dtype(gpt, config.params_dtype)
    return gpt.eval()


def _in_params_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters that are not in `dtype`: the local spec's torch norms, which
    megatron-core builds without a dtype (fp32). TransformerEngine's norms take `params_dtype`, and Megatron
    training's Float16Module casts a bf16/fp16 model whole, so this is the model Megatron trains."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
