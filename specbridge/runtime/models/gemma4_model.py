"""Gemma 4 text model on megatron-core: a `GPTModel` with Gemma's embedding scale, RoPE and softcapping.

Contract: `Gemma4Model(config, block_spec, vocab_size, max_sequence_length, **GPTModel kwargs)`;
`forward(input_ids, position_ids, attention_mask=None)` answers logits [b, s, V] =
`cap * tanh(output_layer(final_layernorm(decoder(embed(ids) * sqrt(H)))) / cap)` (no cap when
`final_logit_softcapping` is None), with per-layer-type RoPE frequencies computed from `position_ids`.
`position_embedding_type` is always "none": megatron's own RoPE is not used.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from specbridge.runtime.models.gemma4_attention import Gemma4RotaryEmbedding
from specbridge.runtime.models.gemma4_config import Gemma4TransformerConfig

_UNSUPPORTED_FORWARD_ARGS = (
    "inference_context",
    "inference_params",
    "packed_seq_params",
    "extra_block_kwargs",
)


class Gemma4Model(GPTModel):
    """GPTModel with Gemma's scaled embedding, per-layer-type RoPE and final logit softcapping."""

    def __init__(
        self,
        config: Gemma4TransformerConfig,
        transformer_layer_spec,
        vocab_size,
        max_sequence_length,
        **kwargs,
    ):
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
        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        logits, _ = self.output_layer(
            hidden_states, weight=weight, runtime_gather_output=runtime_gather_output
        )
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
