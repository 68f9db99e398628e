"""Gemma 4 attention parts on megatron-core: RMSNorm, dual RoPE, and the K=V-aware self-attention.

Contract:
- `Gemma4RMSNorm` computes HF's `Gemma4RMSNorm` exactly: `x * (mean(x^2) + eps) ** -0.5 * w` in fp32,
  cast back (no `1 + w`); `with_weight=False` gives the weightless norm (v_norm, router norm).
- `Gemma4RotaryEmbedding(position_ids)` answers `{layer_type: freqs [s, b, 1, d]}` in megatron's
  non-interleaved layout (`cat(f, f)`), one entry per layer type, from HF's inverse frequencies:
  "default" for sliding layers, "proportional" for full layers (Gemma 3: "default" or "linear"; rotated dims `[0:ra]` and
  `[d/2 : d/2+ra]`; the rest get frequency 0, i.e. cos 1 / sin 0, exactly the identity).
- `Gemma4SelfAttention` is megatron's `SelfAttention` (fused per-group QKV `[q heads | k | v]`,
  ColumnParallel/RowParallel projections, DotProductAttention) plus: it picks its RoPE entry by
  layer type, applies a weightless `v_layernorm` to V, and on K=V layers (`attention_k_eq_v` and
  full attention) takes V from the raw K projection (before `k_layernorm`), so the V rows of
  `linear_qkv` are never read there (import fills them with a copy of K; they receive no gradient).
  Every non-shared layer leaves its K and V (after the norms, before RoPE) in the model's `StageState` under its
  layer type; a KV-shared layer has only `linear_q` (its query heads) and `q_layernorm`, and attends with the K/V
  found there: the last non-shared layer of its type, as in transformers (RoPE applied to the same K at the same
  positions gives the same rotated K). The core attention takes the model's mask per layer type as it is.
"""

from __future__ import annotations

import torch
from megatron.core.parallel_state import get_tensor_model_parallel_rank
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor

from specbridge.runtime.models.gemma4_config import FULL, Gemma4TransformerConfig


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None, unit_offset: bool = False) -> Tensor:
    """HF Gemma 4 RMSNorm: fp32 `x * (mean(x^2) + eps) ** -0.5` (times `weight`), cast back to x's dtype; with
    `unit_offset`, HF Gemma 3's: times `1 + weight` (the weight stored as HF stores it, so nothing is folded)."""
    x32 = x.float()
    normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * (1.0 + weight.float() if unit_offset else weight.float())
    return normed.type_as(x)


class Gemma4RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim with an optional weight initialised to ones (megatron norm signature)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = getattr(config, "norm_unit_offset", False)
        if with_weight:
            init = torch.zeros if self.unit_offset else torch.ones  # the identity either way
            self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
            self.weight.sequence_parallel = config.sequence_parallel
        else:
            self.weight = None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps, self.weight, self.unit_offset)


def rope_inv_freq(params: dict, head_dim: int) -> Tensor:
    """HF's inverse frequencies ([head_dim / 2], fp32) for one layer type's rope parameters."""
    base = params["rope_theta"]
    rope_type = params.get("rope_type", "default")
    if rope_type in ("default", "linear"):  # linear (Gemma 3's full layers): positions divided by the factor
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq / params["factor"] if rope_type == "linear" else inv_freq
    if rope_type != "proportional":
        raise NotImplementedError(f"Gemma 4 RoPE type {rope_type!r} is not supported")
    rope_angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    exponents = torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).float() / head_dim
    rotated = 1.0 / (base**exponents)
    unrotated = torch.zeros(head_dim // 2 - rope_angles, dtype=torch.float32)
    return torch.cat((rotated, unrotated)) / params.get("factor", 1.0)


class Gemma4RotaryEmbedding(torch.nn.Module):
    """Per-layer-type RoPE frequencies; inverse frequencies stay fp32 plain attributes (not state)."""

    def __init__(self, config: Gemma4TransformerConfig) -> None:
        super().__init__()
        self.inv_freq = {
            layer_type: rope_inv_freq(config.rope_parameters[layer_type], config.head_dim(layer_type))
            for layer_type in sorted(set(config.layer_types))
        }

    def forward(self, position_ids: Tensor) -> dict[str, Tensor]:
        """`position_ids` [b, s] -> {layer_type: freqs [s, b, 1, head_dim]} (fp32)."""
        positions = position_ids.float()[..., None]
        out = {}
        for layer_type, inv_freq in self.inv_freq.items():
            freqs = positions * inv_freq.to(position_ids.device)
            out[layer_type] = torch.cat((freqs, freqs), dim=-1).transpose(0, 1).unsqueeze(2)
        return out


class StageState:
    """What one forward of a model chunk hands its layers beside the hidden state.

    `kv[layer_type]`: (K, V) [s, b, groups, d] of the latest non-shared layer of that type (KV sharing).
    `per_layer_inputs`: PLE inputs [s, b, n, P] of global layers `per_layer_offset .. per_layer_offset + n - 1`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.kv: dict[str, tuple[Tensor, Tensor]] = {}
        self.per_layer_inputs: Tensor | None = None
        self.per_layer_offset = 0


def query_projection(input_size: int, output_size: int, *, config, **kwargs) -> ColumnParallelLinear:
    """The `linear_qkv` of a KV-shared layer: its query heads only (`num_attention_heads * kv_channels` rows)."""
    return ColumnParallelLinear(input_size, config.num_attention_heads * config.kv_channels, config=config, **kwargs)


class Gemma4SelfAttention(SelfAttention):
    """megatron SelfAttention with Gemma 4's per-type RoPE, weightless v-norm and K=V on full layers.

    Built with the layer's own config (`Gemma4TransformerConfig.for_layer`), so `kv_channels` and
    `num_query_groups` already are this layer's head dim and KV heads; `layer_number` is global, 1-based.
    """

    def __init__(self, config: Gemma4TransformerConfig, submodules, layer_number: int, **kwargs) -> None:
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        index = layer_number - 1
        self.layer_type = config.layer_types[index]
        self.kv_shared = config.layer_kv_shared[index]
        self.k_eq_v = config.attention_k_eq_v and self.layer_type == FULL
        self.state: StageState | None = None  # the model chunk's, set when the chunk is built
        self.core_attention.scale_mask_softmax.window_size = None  # the model's masks already hold the window
        if self.kv_shared:
            self.linear_q = self.linear_qkv
            del self.linear_qkv
            self.k_layernorm = None
        elif config.value_norm:
            self.v_layernorm = Gemma4RMSNorm(
                config, self.hidden_size_per_attention_head, config.layernorm_epsilon, with_weight=False
            )
        else:
            self.v_layernorm = torch.nn.Identity()

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None, *args, rotary_pos_emb=None, **kwargs
    ):
        """As `SelfAttention.forward`; `rotary_pos_emb` may be the per-layer-type dict of the model."""
        if isinstance(rotary_pos_emb, dict):
            rotary_pos_emb = rotary_pos_emb[self.layer_type]
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask[self.layer_type]
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    def get_query_key_value_tensors(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V [s, b, heads, d] after q/k/v norms; V is the raw K projection on K=V layers."""
        if output_gate or not split_qkv:
            raise NotImplementedError("Gemma 4 attention has no output gate and needs split QKV")
        if self.kv_shared:
            return self._shared_query_key_value(hidden_states)
        mixed_qkv, split_sizes = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=False, split_qkv=False
        )
        query, key, value = torch.split(mixed_qkv, split_sizes, dim=3)
        query = self._local_query_heads(
            query.reshape(*query.shape[:2], -1, self.hidden_size_per_attention_head)
        )
        if self.k_eq_v:
            value = key
        key, value = self.k_layernorm(key), self.v_layernorm(value)
        if self.state is not None:
            self.state.kv[self.layer_type] = (key, value)
        return self.q_layernorm(query), key, value

    def _shared_query_key_value(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This layer's own normed queries; K and V of the last non-shared layer of the same type."""
        if self.state is None or self.layer_type not in self.state.kv:
            raise RuntimeError(f"KV-shared layer {self.layer_number - 1} found no {self.layer_type} K/V to reuse")
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], -1, self.hidden_size_per_attention_head)
        key, value = self.state.kv[self.layer_type]
        return self.q_layernorm(query), key, value

    def _local_query_heads(self, query: Tensor) -> Tensor:
        """This TP rank's query heads when the layer has fewer KV groups than TP ranks (megatron's rule)."""
        groups = self.config.num_query_groups
        if groups >= self.world_size:
            return query
        ranks_per_group = self.world_size // groups
        size = self.num_attention_heads_per_partition // ranks_per_group
        idx = get_tensor_model_parallel_rank() % ranks_per_group
        return query[:, :, idx * size : (idx + 1) * size, :]
