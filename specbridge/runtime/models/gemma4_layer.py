"""Gemma 4 decoder layer on megatron-core, and the layer / block ModuleSpecs.

Contract: `Gemma4TransformerLayer` is a megatron `TransformerLayer` whose attention geometry (head dim,
KV groups) comes from its *global* index (`layer_number` + pipeline offset, via
`Gemma4TransformerConfig.for_layer`), computing, for residual stream h:
    h = h + post_attention_layernorm(self_attention(input_layernorm(h)))
    r = h;  x = pre_mlp_layernorm(r)
    y = mlp(x)  (dense layer)   or   y = mlp(x, r)  (MoE layer, see gemma4_moe)
    h = r + post_mlp_layernorm(y)
    h = h + post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(h)) * p_i))   (PLE only)
    h = h * layer_scalar   (Gemma 4 only: `config.layer_scalar`)
where p_i is this layer's per-layer input (the model's `StageState`; the two small PLE projections are
replicated across TP, so the block adds no reduction). The MLP width is the layer's own
(`layer_ffn_hidden_sizes`). `gemma4_block_spec(config, vp_stage)` answers this pipeline stage's
TransformerBlockSubmodules, one layer spec per layer, built from local (torch) megatron parts:
ColumnParallel/RowParallel linears, DotProductAttention, SequentialMLP; a KV-shared layer's attention has a
query-only projection and no k_layernorm.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank, make_viewless_tensor
from torch import Tensor

from specbridge.runtime.models.gemma4_attention import (
    Gemma4RMSNorm,
    Gemma4SelfAttention,
    StageState,
    query_projection,
)
from specbridge.runtime.models.gemma4_config import Gemma4TransformerConfig
from specbridge.runtime.models.gemma4_moe import Gemma4MoELayer, Gemma4Router


@dataclasses.dataclass
class Gemma4LayerSubmodules(TransformerLayerSubmodules):
    """TransformerLayerSubmodules plus Gemma's post-attention and post-MLP norms."""

    post_attention_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class Gemma4TransformerLayer(TransformerLayer):
    """A Gemma 4 decoder layer; its attention geometry comes from its global index.

    Parameters beyond TransformerLayer's: `post_attention_layernorm`, `post_mlp_layernorm`, and
    `layer_scalar` [1] (HF's saved buffer; a frozen parameter here so it is mapped like weights).
    """

    def __init__(
        self, config, submodules, layer_number=1, hidden_dropout=None, pg_collection=None, vp_stage=None
    ):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        offset = get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        config = config.for_layer(layer_number + offset - 1)
        base = dataclasses.replace(submodules, mlp=IdentityOp)
        super().__init__(config, base, layer_number, hidden_dropout, pg_collection, vp_stage)
        self.mlp = self._build_mlp(submodules.mlp, pg_collection)
        self.is_moe_layer = isinstance(self.mlp, MoELayer)
        norm_args = dict(config=self.config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.post_attention_layernorm = build_module(submodules.post_attention_layernorm, **norm_args)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_args)
        if config.layer_scalar:
            self.layer_scalar = torch.nn.Parameter(torch.ones(1, dtype=config.params_dtype), requires_grad=False)
        self.state: StageState | None = None  # the model chunk's, set when the chunk is built
        if config.per_layer_input_size:
            self._build_per_layer_input_block(config, pg_collection)

    def _build_per_layer_input_block(self, config, pg_collection) -> None:
        """PLE: gate H -> P, projection P -> H (small: replicated across TP), norm over H."""
        width, dtype = config.per_layer_input_size, config.params_dtype
        self.per_layer_input_gate = torch.nn.Linear(config.hidden_size, width, bias=False, dtype=dtype)
        self.per_layer_projection = torch.nn.Linear(width, config.hidden_size, bias=False, dtype=dtype)
        self.post_per_layer_input_norm = Gemma4RMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    def _build_mlp(self, spec, pg_collection):
        """The dense MLP (TP group) or the Gemma MoE block (full process-group collection)."""
        if issubclass(spec.module, MoELayer):
            mlp = build_module(spec, config=self.config, pg_collection=pg_collection)
            mlp.set_layer_number(self.layer_number)
            return mlp
        return build_module(
            spec,
            config=self.config,
            ffn_hidden_size=self.config.ffn_hidden_size,
            tp_group=pg_collection.tp,
        )

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        *,
        rotary_pos_emb=None,
        padding_mask=None,
        **kwargs,
    ):
        """[s, b, h] -> ([s, b, h], context). Extra megatron kwargs go to self-attention."""
        attention_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("context_mask", "dynamic_inference_decode_only")
        }
        residual = hidden_states
        attention, _ = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            **attention_kwargs,
        )
        hidden_states = residual + self._dropout(self.post_attention_layernorm(attention))
        residual = hidden_states
        normed = self.pre_mlp_layernorm(hidden_states)
        if self.is_moe_layer:
            output, _ = self.mlp(normed, residual, padding_mask=padding_mask)
        else:
            output, _ = self.mlp(normed)
        hidden_states = residual + self._dropout(self.post_mlp_layernorm(output))
        if self.config.per_layer_input_size:
            hidden_states = hidden_states + self._per_layer_input_block(hidden_states)
        if self.config.layer_scalar:
            hidden_states = hidden_states * self.layer_scalar.to(hidden_states.dtype)
        return make_viewless_tensor(
            hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        ), context

    def _per_layer_input_block(self, hidden_states: Tensor) -> Tensor:
        gated = self.config.activation_func(self.per_layer_input_gate(hidden_states)) * self._per_layer_input()
        return self.post_per_layer_input_norm(self.per_layer_projection(gated))

    def _per_layer_input(self) -> Tensor:
        """This layer's per-layer input [s, b, P] (from the model chunk's stage state)."""
        state = self.state
        if state is None or state.per_layer_inputs is None:
            raise RuntimeError(f"layer {self.layer_number - 1} has per-layer embeddings but received no inputs")
        return state.per_layer_inputs[:, :, self.layer_number - 1 - state.per_layer_offset]

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.hidden_dropout, training=self.training)


def gemma4_layer_spec(config: Gemma4TransformerConfig, index: int):
    """ModuleSpec of global layer `index`: local (torch) megatron parts, MoE block when experts are set."""
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    dense = ModuleSpec(module=MLP, submodules=linears)
    mlp = dense
    if config.num_moe_experts:
        experts = ModuleSpec(module=SequentialMLP, submodules=linears)
        mlp = ModuleSpec(
            module=Gemma4MoELayer,
            submodules=MoESubmodules(experts=experts, shared_experts=dense, router=Gemma4Router),
        )
    shared = config.layer_kv_shared[index]
    attention = ModuleSpec(
        module=Gemma4SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=query_projection if shared else ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=Gemma4RMSNorm,
            k_layernorm=Gemma4RMSNorm,  # dropped again by a KV-shared layer (megatron-core 0.19 wants one here)
        ),
    )
    return ModuleSpec(
        module=Gemma4TransformerLayer,
        submodules=Gemma4LayerSubmodules(
            input_layernorm=Gemma4RMSNorm,
            self_attention=attention,
            post_attention_layernorm=Gemma4RMSNorm,
            pre_mlp_layernorm=Gemma4RMSNorm,
            mlp=mlp,
            post_mlp_layernorm=Gemma4RMSNorm,
        ),
    )


def gemma4_block_spec(config: Gemma4TransformerConfig, vp_stage: int | None = None):
    """TransformerBlockSubmodules for this pipeline stage, with Gemma's RMSNorm as the final norm."""
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage)
    layers = [gemma4_layer_spec(config, offset + k) for k in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=Gemma4RMSNorm)
