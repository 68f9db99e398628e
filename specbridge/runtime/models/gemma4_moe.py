"""Gemma 4 MoE block on megatron-core: router on the raw residual, dense MLP beside routed experts.

Contract (HF `Gemma4TextDecoderLayer` with `enable_moe_block`), for residual r and
`x = pre_mlp_layernorm(r)` (HF pre_feedforward_layernorm, applied by the layer):
    dense  = post_shared_experts_layernorm(shared_experts(x))                  # HF mlp, *_layernorm_1
    probs  = router(r)   = top-k renormalised softmax(proj(rms(r) * scale * H**-0.5)) * per_expert_scale
    moe    = post_experts_layernorm(experts(pre_experts_layernorm(r), probs))  # *_layernorm_2
    output = dense + moe    (the layer then applies post_mlp_layernorm and the residual add)
Routing, dispatch and experts are megatron's (TopKRouter top-k + softmax, token dispatcher, SequentialMLP):
softmax over the top-k logits equals HF's renormalised top-k of the full softmax.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import build_module
from torch import Tensor

from specbridge.runtime.models.gemma4_attention import Gemma4RMSNorm, rms_norm


class Gemma4Router(TopKRouter):
    """TopKRouter fed `rms(r) * scale * hidden**-0.5`, with probs scaled by `per_expert_scale[e]`.

    Parameters: `weight` [E, H] (HF router.proj.weight), `scale` [H], `per_expert_scale` [E];
    all replicated across TP and EP ranks.
    """

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        # kwargs: whatever this megatron-core release's MoELayer passes on (0.19: `is_mtp_layer`).
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.scale = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype))
        self.per_expert_scale = torch.nn.Parameter(
            torch.ones(config.num_moe_experts, dtype=config.params_dtype)
        )
        for param in (self.scale, self.per_expert_scale):
            param.sequence_parallel = config.sequence_parallel
        self.input_scale = config.hidden_size**-0.5

    def forward(self, input: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`input` is the raw residual [s, b, H]; answers (probs [T, E], routing_map [T, E])."""
        scaled = rms_norm(input, self.config.layernorm_epsilon) * self.scale * self.input_scale
        probs, routing_map = super().forward(scaled, padding_mask=padding_mask)
        return probs * self.per_expert_scale.to(probs.dtype), routing_map


class Gemma4MoELayer(MoELayer):
    """megatron MoELayer (router, dispatcher, experts) plus Gemma's dense MLP and branch norms.

    `shared_experts` is a plain megatron MLP of width `ffn_hidden_size` (HF's per-layer `mlp`); the
    config must leave `moe_shared_expert_intermediate_size` unset so MoELayer builds none itself.
    """

    def __init__(
        self, config, submodules, layer_number: int | None = None, pg_collection=None, **kwargs
    ) -> None:
        # kwargs: MoELayer arguments of newer megatron-core releases (0.19: `is_mtp_layer`, `name`).
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **kwargs,
        )
        self.shared_experts = build_module(
            submodules.shared_experts,
            config=config,
            ffn_hidden_size=config.ffn_hidden_size,
            tp_group=self.tp_group,
        )
        eps = config.layernorm_epsilon
        self.post_shared_experts_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        self.pre_experts_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        self.post_experts_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)

    def forward(self, hidden_states: Tensor, residual: Tensor, padding_mask: Tensor | None = None):
        """`hidden_states` = pre_mlp_layernorm(r), `residual` = r, both [s, b, H]; answers (out, None)."""
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        dense, _ = self.shared_experts(hidden_states)
        dense = self.post_shared_experts_layernorm(dense)
        probs, routing_map = self.router(residual, padding_mask)
        tokens, probs = self.preprocess(self.pre_experts_layernorm(residual), probs, routing_map)
        tokens, probs = self.dispatch(tokens, probs)
        routed, _ = self.routed_experts_compute(tokens, probs)
        routed = self.postprocess(self.combine(routed), None)
        return dense + self.post_experts_layernorm(routed), None
