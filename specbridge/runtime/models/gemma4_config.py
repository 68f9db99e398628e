"""Gemma 4 decoder: the megatron-core TransformerConfig with the per-layer facts megatron has no field for.

Contract: `Gemma4TransformerConfig(**kwargs)` takes the fields the spec's `mcore.transformer` section computes
(`specs/gemma4.yaml`; the spec is the one description of the family, this module only holds the values).
Per-layer lists, indexed by the 0-based *global* layer index: `layer_types` ("sliding_attention" /
"full_attention"), `layer_kv_channels` (head dim), `layer_num_query_groups` (KV heads), `layer_ffn_hidden_sizes`
(the dense MLP width, doubled on E2B's KV-shared tail), `layer_kv_shared` (the layer has no K/V projection and
attends with the K/V of the last non-shared layer of its type). `for_layer(i)` answers the config layer `i` is
built with (pipeline stages pass their offset). Base `kv_channels` / `num_query_groups` / `ffn_hidden_size` are
the spec's defaults, replaced per layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class Gemma4TransformerConfig(TransformerConfig):
    """TransformerConfig plus Gemma 4's per-layer geometry, RoPE per layer type, softcapping and PLE width.

    `rope_parameters` is HF's per-layer-type dict ({"rope_type", "rope_theta", "partial_rotary_factor", "factor"});
    `per_layer_input_size` is the per-layer-embedding width (0: no per-layer embeddings); `bidirectional_vision`:
    sliding layers let the tokens of one image attend to each other both ways. `norm_unit_offset`, `value_norm`
    and `layer_scalar` select Gemma 3's variants of the same decoder.
    """

    layer_types: list[str] | None = None
    layer_kv_channels: list[int] | None = None
    layer_num_query_groups: list[int] | None = None
    layer_ffn_hidden_sizes: list[int] | None = None
    layer_kv_shared: list[bool] | None = None
    attention_k_eq_v: bool = False
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = None
    per_layer_input_size: int = 0
    bidirectional_vision: bool = False
    # the options Gemma 3 (specs/gemma3.yaml) sets on the same decoder:
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + w), w stored as HF stores it (Gemma 3); else by w
    value_norm: bool = True  # the weightless RMSNorm on V (Gemma 4; not Gemma 3)
    layer_scalar: bool = True  # each layer's output scaled by its `layer_scalar` (Gemma 4; not Gemma 3)

    def __post_init__(self) -> None:
        if self.window_size is not None:
            self.window_size = tuple(self.window_size)
        super().__post_init__()
        n = self.num_layers
        self.layer_kv_channels = self.layer_kv_channels or [self.kv_channels] * n
        self.layer_num_query_groups = self.layer_num_query_groups or [self.num_query_groups] * n
        self.layer_ffn_hidden_sizes = self.layer_ffn_hidden_sizes or [self.ffn_hidden_size] * n
        self.layer_kv_shared = self.layer_kv_shared or [False] * n
        lists = (self.layer_types, self.layer_kv_channels, self.layer_num_query_groups, self.layer_ffn_hidden_sizes,
                 self.layer_kv_shared)
        if any(values is None or len(values) != n for values in lists):
            raise ValueError(f"every per-layer list of a Gemma 4 config must have one entry per layer ({n})")

    def is_full(self, index: int) -> bool:
        """Whether global layer `index` (0-based) is a full-attention layer."""
        return self.layer_types[index] == FULL

    def head_dim(self, layer_type: str) -> int:
        """Head dim of the layers of `layer_type` (the spec gives every layer of one type the same geometry)."""
        return self.layer_kv_channels[self.layer_types.index(layer_type)]

    def for_layer(self, index: int) -> Gemma4TransformerConfig:
        """Shallow copy with the attention geometry and FFN width of global layer `index` (0-based)."""
        config = copy.copy(self)
        config.kv_channels = self.layer_kv_channels[index]
        config.num_query_groups = self.layer_num_query_groups[index]
        config.ffn_hidden_size = self.layer_ffn_hidden_sizes[index]
        return config

    def kv_source(self, index: int) -> int | None:
        """The layer whose K/V a KV-shared layer `index` attends with: the last non-shared layer of its type."""
        if not self.layer_kv_shared[index]:
            return None
        sources = [j for j in range(index) if not self.layer_kv_shared[j]
                   and self.layer_types[j] == self.layer_types[index]]
        if not sources:
            raise ValueError(f"KV-shared layer {index} has no earlier non-shared {self.layer_types[index]} layer")
        return sources[-1]


def per_layer_checkpoint_keys() -> dict:
    """Sliding and full layers differ in shape, so dist checkpoints must key each layer on its own instead of
    stacking all layers under one key (megatron-core's `hetereogenous_dist_checkpoint`, spelled as it is there)."""
    field = "hetereogenous_dist_checkpoint"
    return {field: True} if field in TransformerConfig.__dataclass_fields__ else {}
