"""Gemma 4 text decoder (transformers `Gemma4ForCausalLM`) built from megatron-core parts.

Contract: `build_gemma4(hf_config, transformer, model)` answers a `Gemma4Model` (a `GPTModel`) for
this rank's place in the parallel layout (parallel state must be initialised) whose forward
`model(input_ids, position_ids, attention_mask=None)` returns logits [b, s, V] equal to HF's
`Gemma4ForCausalLM` logits given the same weights. Every HF tensor maps to exactly one megatron
parameter (see `notes_gemma4.md` / the test's mapping); no weight is folded into another.

Per layer (global index i, from megatron's 1-based `layer_number`), with residual stream h:
    h = h + post_attention_layernorm(self_attention(input_layernorm(h)))
    r = h;  x = pre_mlp_layernorm(r)
    dense layer:  y = mlp(x)                  MoE layer:  y = mlp(x, r)   (see gemma4_moe)
    h = (r + post_mlp_layernorm(y)) * layer_scalar
then final_layernorm, tied (or untied) output layer, and `cap * tanh(z / cap)` logit softcapping.
Embeddings are scaled by sqrt(hidden) in the embedding dtype, as HF does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from specbridge.runtime import cpu_compat
from specbridge.runtime.models.gemma4_config import (
    Gemma4TransformerConfig,
    model_kwargs,
    transformer_kwargs,
)

_UNSUPPORTED_FORWARD_ARGS = ("inference_context", "inference_params", "packed_seq_params", "extra_block_kwargs")


def _text_config(hf_config):
    """The text config of a Gemma4TextConfig or of a multimodal Gemma4Config."""
    if getattr(hf_config, "model_type", None) == "gemma4":
        return hf_config.get_text_config()
    return hf_config


def _parallel_defaults() -> dict:
    """TransformerConfig parallel sizes read from megatron's parallel_state (empty when uninitialised)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    sizes = dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
    )
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp:
        sizes["virtual_pipeline_model_parallel_size"] = vpp
    return sizes


def _layer_classes():
    """Gemma4LayerSubmodules / Gemma4TransformerLayer, defined lazily (megatron import is heavy)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
        get_transformer_layer_offset,
    )
    from megatron.core.utils import get_pg_rank, make_viewless_tensor

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

        def __init__(self, config, submodules, layer_number=1, hidden_dropout=None, pg_collection=None, vp_stage=None):
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
            self.layer_scalar = torch.nn.Parameter(torch.ones(1, dtype=config.params_dtype), requires_grad=False)

        def _build_mlp(self, spec, pg_collection):
            """The dense MLP (TP group) or the Gemma MoE block (full process-group collection)."""
            if issubclass(spec.module, MoELayer):
                mlp = build_module(spec, config=self.config, pg_collection=pg_collection)
                mlp.set_layer_number(self.layer_number)
                return mlp
            return build_module(spec, config=self.config, ffn_hidden_size=self.config.ffn_hidden_size, tp_group=pg_collection.tp)

        def forward(self, hidden_states, attention_mask=None, context=None, *, rotary_pos_emb=None, padding_mask=None, **kwargs):
            """[s, b, h] -> ([s, b, h], context). Extra megatron kwargs go to self-attention."""
            attention_kwargs = {k: v for k, v in kwargs.items() if k not in ("context_mask", "dynamic_inference_decode_only")}
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
            hidden_states = hidden_states * self.layer_scalar.to(hidden_states.dtype)
            return make_viewless_tensor(hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True), context

        def _dropout(self, x: Tensor) -> Tensor:
            return F.dropout(x, p=self.hidden_dropout, training=self.training)

    return Gemma4LayerSubmodules, Gemma4TransformerLayer


def gemma4_layer_spec(config: Gemma4TransformerConfig):
    """ModuleSpec of one Gemma 4 layer: local (torch) megatron parts, MoE block when experts are set."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from specbridge.runtime.models.gemma4_attention import Gemma4RMSNorm, Gemma4SelfAttention
    from specbridge.runtime.models.gemma4_moe import Gemma4MoELayer, Gemma4Router

    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    dense = ModuleSpec(module=MLP, submodules=linears)
    mlp = dense
    if config.num_moe_experts:
        experts = ModuleSpec(module=SequentialMLP, submodules=linears)
        mlp = ModuleSpec(
            module=Gemma4MoELayer,
            submodules=MoESubmodules(experts=experts, shared_experts=dense, router=Gemma4Router),
        )
    attention = ModuleSpec(
        module=Gemma4SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=Gemma4RMSNorm,
            k_layernorm=Gemma4RMSNorm,
        ),
    )
    submodules_cls, layer_cls = _layer_classes()
    return ModuleSpec(
        module=layer_cls,
        submodules=submodules_cls(
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
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from specbridge.runtime.models.gemma4_attention import Gemma4RMSNorm

    layer = gemma4_layer_spec(config)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=Gemma4RMSNorm)


def _model_class():
    """Gemma4Model, defined lazily (megatron import is heavy)."""
    from megatron.core.models.gpt import GPTModel

    from specbridge.runtime.models.gemma4_attention import Gemma4RotaryEmbedding

    class Gemma4Model(GPTModel):
        """GPTModel with Gemma's scaled embedding, per-layer-type RoPE and final logit softcapping."""

        def __init__(self, config: Gemma4TransformerConfig, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs):
            if kwargs.setdefault("position_embedding_type", "none") != "none":
                raise ValueError("Gemma 4 computes its own RoPE: position_embedding_type must be 'none'")
            super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
            self.gemma4_rotary = Gemma4RotaryEmbedding(config)

        def forward(
            self,
            input_ids: Tensor | None,
            position_ids: Tensor | None,
            attention_mask: Tensor | None = None,
            decoder_input: Tensor | None = None,
            labels: Tensor | None = None,
            runtime_gather_output: bool | None = None,
            padding_mask: Tensor | None = None,
            **unsupported,
        ) -> Tensor:
            """Logits [b, s, V] (loss [b, s] with labels; hidden [s, b, h] off the last stage).

            `attention_mask` is megatron's (bool, True = masked); sliding layers always use their own
            window mask, as megatron's DotProductAttention does.
            """
            given = sorted(k for k, v in unsupported.items() if v is not None and k in _UNSUPPORTED_FORWARD_ARGS)
            unknown = sorted(k for k in unsupported if k not in _UNSUPPORTED_FORWARD_ARGS)
            if given or unknown:
                raise NotImplementedError(f"Gemma4Model.forward does not support {given + unknown}")
            if decoder_input is None and self.pre_process:
                decoder_input = self._embed(input_ids)
            if position_ids is None:
                position_ids = self._default_positions(input_ids, decoder_input)
            hidden_states = self.decoder(
                hidden_states=decoder_input,
                attention_mask=attention_mask,
                rotary_pos_emb=self.gemma4_rotary(position_ids),
                padding_mask=padding_mask,
            )
            if not self.post_process:
                return hidden_states
            return self._logits_or_loss(hidden_states, labels, runtime_gather_output)

        def _embed(self, input_ids: Tensor) -> Tensor:
            """Word embedding [s, b, h] times sqrt(hidden) rounded to the embedding dtype (as HF)."""
            embedded = self.embedding(input_ids=input_ids, position_ids=None)
            scale = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(embedded.dtype)
            return embedded * scale.to(embedded.device)

        def _default_positions(self, input_ids: Tensor | None, decoder_input: Tensor | None) -> Tensor:
            """0..s-1 for every sequence, sized from the input ids or this stage's input tensor."""
            if input_ids is not None:
                batch, seq = input_ids.shape
                device = input_ids.device
            else:
                hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
                seq, batch = hidden.shape[:2]
                device = hidden.device
            return torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)

        def _logits_or_loss(self, hidden_states: Tensor, labels: Tensor | None, runtime_gather_output) -> Tensor:
            weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
            logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=runtime_gather_output)
            cap = self.config.final_logit_softcapping
            if cap:
                logits = torch.tanh(logits / cap) * cap
            if labels is None:
                return logits.transpose(0, 1).contiguous()
            return self.compute_language_model_loss(labels, logits)

    return Gemma4Model


def build_gemma4(
    hf_config,
    transformer: dict,
    model: dict,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """Build this rank's Gemma 4 text model chunk (eval mode) from a transformers Gemma 4 config.

    `hf_config`: a `Gemma4TextConfig` (or a `Gemma4Config`, whose text config is used).
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
    from specbridge.runtime.models.gpt import transformer_config_kwargs

    hf_config = _text_config(hf_config)
    kwargs = {**transformer_kwargs(hf_config), **_parallel_defaults(), **transformer}
    config = Gemma4TransformerConfig(**transformer_config_kwargs(kwargs))
    gemma = _model_class()(
        config=config,
        transformer_layer_spec=gemma4_block_spec(config, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **{**model_kwargs(hf_config), **model},
    )
    return gemma.eval()
