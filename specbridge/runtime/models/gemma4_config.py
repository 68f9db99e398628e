"""Gemma 4 text decoder: megatron-core configuration derived from a transformers `Gemma4TextConfig`.

Contract: `transformer_kwargs(hf_config)` and `model_kwargs(hf_config)` answer plain dicts of
`Gemma4TransformerConfig` / `GPTModel` keyword arguments that reproduce the HF text model's math;
`check_supported(hf_config)` raises `NotImplementedError` naming any Gemma 4 feature this runtime does
not model (per-layer embeddings, KV sharing, bidirectional attention, biases, other RoPE types).

Two attention geometries exist: sliding layers use (`kv_channels`, `num_query_groups`), full layers
(`global_kv_channels`, `global_num_query_groups`). `Gemma4TransformerConfig.for_layer(i)` answers the
config a layer with 0-based *global* index `i` is built with (pipeline stages pass their offset).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

SLIDING = "sliding_attention"
FULL = "full_attention"
_ROPE_TYPES = ("default", "proportional")


@dataclass
class Gemma4TransformerConfig(TransformerConfig):
    """TransformerConfig plus the Gemma 4 facts megatron-core has no field for.

    `layer_types[i]` is HF's "sliding_attention" / "full_attention" for global layer i.
    `rope_parameters` is HF's per-layer-type dict ({"rope_type", "rope_theta",
    "partial_rotary_factor", "factor"}). Base `kv_channels` / `num_query_groups` describe sliding layers.
    """

    layer_types: list[str] | None = None
    global_kv_channels: int | None = None
    global_num_query_groups: int | None = None
    attention_k_eq_v: bool = False
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None or len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types must list one type per layer ({self.num_layers})")
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise NotImplementedError(f"Gemma 4 layer types {sorted(unknown)} are not supported")
        if self.global_kv_channels is None:
            self.global_kv_channels = self.kv_channels
        if self.global_num_query_groups is None:
            self.global_num_query_groups = self.num_query_groups
        for layer_type in set(self.layer_types):
            _check_rope(self.rope_parameters, layer_type)

    def is_full(self, index: int) -> bool:
        """Whether global layer `index` (0-based) is a full-attention layer."""
        return self.layer_types[index] == FULL

    def head_dim(self, layer_type: str) -> int:
        """Head dim of layers of `layer_type`."""
        return self.global_kv_channels if layer_type == FULL else self.kv_channels

    def for_layer(self, index: int) -> Gemma4TransformerConfig:
        """Shallow copy with the attention geometry of global layer `index` (0-based)."""
        config = copy.copy(self)
        if self.is_full(index):
            config.kv_channels = self.global_kv_channels
            config.num_query_groups = self.global_num_query_groups
        return config


def _check_rope(rope_parameters: dict | None, layer_type: str) -> None:
    """Raise unless `rope_parameters[layer_type]` is a RoPE type this runtime reproduces exactly."""
    params = (rope_parameters or {}).get(layer_type)
    if params is None or "rope_theta" not in params:
        raise ValueError(f"rope_parameters[{layer_type!r}] with a rope_theta is required")
    rope_type = params.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise NotImplementedError(f"Gemma 4 RoPE type {rope_type!r} ({layer_type}) is not supported")


def _layer_geometry(hf_config, index: int) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of HF layer `index`, read from `per_layer_config` when present."""
    per_layer = getattr(hf_config, "per_layer_config", None)
    layer = per_layer[index] if per_layer is not None else hf_config
    return layer.head_dim, layer.num_key_value_heads


def _geometry_by_type(hf_config) -> dict[str, tuple[int, int]]:
    """{layer_type: (head_dim, kv_heads)}; raises if layers of one type disagree."""
    geometry: dict[str, tuple[int, int]] = {}
    for index, layer_type in enumerate(hf_config.layer_types):
        found = _layer_geometry(hf_config, index)
        if geometry.setdefault(layer_type, found) != found:
            raise NotImplementedError(
                f"Gemma 4 {layer_type} layers with differing geometry ({geometry[layer_type]} vs {found})"
            )
    return geometry


def check_supported(hf_config) -> None:
    """Raise NotImplementedError naming each Gemma 4 text feature this runtime does not model."""
    unsupported = []
    if getattr(hf_config, "hidden_size_per_layer_input", 0):
        unsupported.append("per-layer embeddings (hidden_size_per_layer_input > 0)")
    if getattr(hf_config, "num_kv_shared_layers", 0):
        unsupported.append("KV sharing (num_kv_shared_layers > 0)")
    if getattr(hf_config, "use_bidirectional_attention", None) == "all":
        unsupported.append("bidirectional attention (use_bidirectional_attention='all')")
    if getattr(hf_config, "attention_bias", False):
        unsupported.append("attention biases (attention_bias=True)")
    if unsupported:
        raise NotImplementedError("Gemma 4 features not supported: " + "; ".join(unsupported))
    for layer_type in set(hf_config.layer_types):
        _check_rope(hf_config.rope_parameters, layer_type)


def transformer_kwargs(hf_config) -> dict:
    """`Gemma4TransformerConfig` kwargs reproducing the HF Gemma 4 text model's math.

    Parallel sizes, dtypes and dispatcher choices are not set here; the caller adds them.
    """
    check_supported(hf_config)
    geometry = _geometry_by_type(hf_config)
    head_dim, kv_heads = geometry.get(SLIDING, geometry.get(FULL))
    global_head_dim, global_kv_heads = geometry.get(FULL, (head_dim, kv_heads))
    window = hf_config.sliding_window
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        global_kv_channels=global_head_dim,
        global_num_query_groups=global_kv_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=hf_config.hidden_activation,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=1.0,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        window_size=(window - 1, 0),
        window_attn_skip_freq=[int(t == SLIDING) for t in hf_config.layer_types],
        init_method_std=hf_config.initializer_range,
        layer_types=list(hf_config.layer_types),
        attention_k_eq_v=bool(hf_config.attention_k_eq_v),
        rope_parameters={t: dict(hf_config.rope_parameters[t]) for t in set(hf_config.layer_types)},
        final_logit_softcapping=hf_config.final_logit_softcapping,
        **_per_layer_checkpoint_keys(),
    )
    if hf_config.enable_moe_block:
        kwargs.update(
            num_moe_experts=hf_config.num_experts,
            moe_router_topk=hf_config.top_k_experts,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_expert_capacity_factor=None,
        )
    return kwargs


def _per_layer_checkpoint_keys() -> dict:
    """Sliding and full layers differ in shape, so dist checkpoints must key each layer on its own instead of
    stacking all layers under one key (megatron-core's `hetereogenous_dist_checkpoint`, spelled as it is there)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    field = "hetereogenous_dist_checkpoint"
    return {field: True} if field in TransformerConfig.__dataclass_fields__ else {}


def model_kwargs(hf_config) -> dict:
    """`GPTModel` kwargs for the HF config (RoPE is Gemma's own, so no position embedding here)."""
    return dict(
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="none",
    )
