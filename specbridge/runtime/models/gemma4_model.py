"""Gemma 4 model on megatron-core: a `GPTModel` with Gemma's embeddings, per-layer embeddings, masks, RoPE,
towers, softcapping, and the tensors KV sharing and PLE need carried between pipeline stages.

Contract: `Gemma4Model(config, block_spec, vocab_size, max_sequence_length, multimodal=None, **GPTModel kwargs)`;
`forward(input_ids, position_ids, attention_mask=None, ..., pixel_values=None, image_position_ids=None,
input_features=None, input_features_mask=None)` answers logits [b, s, V] (last stage) as transformers computes:
- embedding (first stage): `embed(ids') * sqrt(H)`, where ids' has every soft-token id replaced by the pad id
  (multimodal models only); the towers' soft tokens are then scattered at the image / audio token positions;
- PLE (first stage): `p = (norm(proj(e) * H**-0.5 -> [L, P]) + ple_table(ids') * sqrt(P)) * 2**-0.5`, e the
  embedding above; layer i reads p[:, :, i];
- masks (every stage, from the ids): full layers causal; sliding layers `window AND (causal OR same image)` when
  the config attends bidirectionally within images (`use_bidirectional_attention == "vision"`), else
  `window AND causal`; image blocks are runs of image / video token ids (transformers' `mm_token_type_ids` 1, 2);
- logits: `cap * tanh(output_layer(final_layernorm(h)) / cap)`.
Pipeline: a stage sends `cat(hidden, carry)` along the last dim, where the carry holds what later stages need and
cannot recompute: the per-layer inputs of the layers after it and, for each layer type a later KV-shared layer
reads, the K and V [s, b, groups/tp * d] of its source layer when that sits on this or an earlier stage
(`carry_layout`). The receiving stage splits it again (`set_input_tensor`). megatron-core's schedules send one
tensor; its width differs from hidden_size, so the builder turns on `variable_seq_lengths` (shapes exchanged).
`position_embedding_type` is always "none": Gemma's own RoPE is used.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import Tensor

from specbridge.runtime.models.gemma4_attention import Gemma4RMSNorm, Gemma4RotaryEmbedding, StageState
from specbridge.runtime.models.gemma4_config import SLIDING, Gemma4TransformerConfig
from specbridge.runtime.models.gemma4_towers import MultimodalParts, audio_soft_tokens, image_soft_tokens

_UNSUPPORTED_FORWARD_ARGS = (
    "inference_context",
    "inference_params",
    "packed_seq_params",
    "extra_block_kwargs",
)


def needs_pipeline_carry(transformer: dict) -> bool:
    """Whether stages of this config send more than the hidden state (PLE inputs or shared K/V)."""
    return bool(transformer.get("per_layer_input_size")) or any(transformer.get("layer_kv_shared") or ())


def carry_layout(config: Gemma4TransformerConfig, boundary: int, tp: int) -> list[tuple[str, int]]:
    """[(name, width)] carried across the stage boundary before global layer `boundary`, in order:
    "per_layer_inputs" ((L - boundary) * P) and, per layer type, "k:<type>" / "v:<type>" (groups/tp * d)."""
    n = config.num_layers
    out = []
    if config.per_layer_input_size and boundary < n:
        out.append(("per_layer_inputs", (n - boundary) * config.per_layer_input_size))
    for layer_type in sorted(set(config.layer_types)):
        readers = [j for j in range(boundary, n) if config.layer_kv_shared[j] and config.layer_types[j] == layer_type]
        if readers and config.kv_source(readers[0]) < boundary:
            source = config.kv_source(readers[0])
            local_groups = max(config.layer_num_query_groups[source] // tp, 1)  # fewer groups than TP: one each
            width = local_groups * config.layer_kv_channels[source]
            out += [(f"k:{layer_type}", width), (f"v:{layer_type}", width)]
    return out


class Gemma4Model(GPTModel):
    """GPTModel with Gemma's embeddings, PLE, masks, per-layer-type RoPE, towers and final logit softcapping."""

    def __init__(
        self,
        config: Gemma4TransformerConfig,
        transformer_layer_spec,
        vocab_size,
        max_sequence_length,
        multimodal: MultimodalParts | None = None,
        **kwargs,
    ):
        if kwargs.setdefault("position_embedding_type", "none") != "none":
            raise ValueError("Gemma 4 computes its own RoPE: position_embedding_type must be 'none'")
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        self.gemma4_rotary = Gemma4RotaryEmbedding(config)
        self.multimodal = multimodal
        for name, module in (multimodal.towers if multimodal is not None else {}).items():
            self.add_module(name, module)
        if self.pre_process and config.per_layer_input_size:
            self._build_per_layer_embedding(config, vocab_size)
        self.stage_state = StageState()
        for layer in self.decoder.layers:
            layer.state = layer.self_attention.state = self.stage_state
        tp = config.tensor_model_parallel_size
        numbers = [layer.layer_number for layer in self.decoder.layers]
        first = numbers[0] - 1 if numbers else 0
        last = numbers[-1] if numbers else first
        self.carry_in = [] if self.pre_process else carry_layout(config, first, tp)
        self.carry_out = [] if self.post_process else carry_layout(config, last, tp)
        self._received: Tensor | None = None

    def _build_per_layer_embedding(self, config: Gemma4TransformerConfig, vocab_size: int) -> None:
        width = config.num_layers * config.per_layer_input_size
        self.per_layer_embedding = VocabParallelEmbedding(
            vocab_size, width, init_method=config.init_method, config=config
        )
        self.per_layer_model_projection = torch.nn.Linear(
            config.hidden_size, width, bias=False, dtype=config.params_dtype
        )
        self.per_layer_projection_norm = Gemma4RMSNorm(
            config, config.per_layer_input_size, config.layernorm_epsilon
        )

    # ------------------------------------------------------------ pipeline

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's `cat(hidden, carry)`; split in `forward` (this keeps the schedule's tensor)."""
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        self._received = tensor
        hidden = tensor
        if tensor is not None and self.carry_in:
            hidden = tensor[..., : self.config.hidden_size]
        super().set_input_tensor(hidden)

    def _unpack_carry(self) -> None:
        if not self.carry_in or self._received is None:
            return
        pieces = torch.split(self._received[..., self.config.hidden_size :], [w for _, w in self.carry_in], dim=-1)
        for (name, _), piece in zip(self.carry_in, pieces):
            if name == "per_layer_inputs":
                self.stage_state.per_layer_inputs = piece.unflatten(-1, (-1, self.config.per_layer_input_size))
                self.stage_state.per_layer_offset = self.decoder.layers[0].layer_number - 1
            else:
                kind, layer_type = name.split(":")
                d = self.config.head_dim(layer_type)
                k, v = self.stage_state.kv.get(layer_type, (None, None))
                piece = piece.unflatten(-1, (-1, d))
                self.stage_state.kv[layer_type] = (piece, v) if kind == "k" else (k, piece)

    def _pack_carry(self, hidden: Tensor) -> Tensor:
        if not self.carry_out:
            return hidden
        state, boundary = self.stage_state, self.decoder.layers[-1].layer_number
        pieces = [hidden]
        for name, _ in self.carry_out:
            if name == "per_layer_inputs":
                rest = state.per_layer_inputs[:, :, boundary - state.per_layer_offset :]
                pieces.append(rest.flatten(-2))
            else:
                kind, layer_type = name.split(":")
                k, v = state.kv[layer_type]
                pieces.append((k if kind == "k" else v).flatten(-2))
        return torch.cat(pieces, dim=-1)

    # ------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        decoder_input: Tensor | None = None,
        labels: Tensor | None = None,
        runtime_gather_output: bool | None = None,
        padding_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        input_features: Tensor | None = None,
        input_features_mask: Tensor | None = None,
        **unsupported,
    ) -> Tensor:
        """Logits [b, s, V] (loss [b, s] with labels; `cat(hidden, carry)` [s, b, *] off the last stage).

        `attention_mask` (megatron's: bool, True = masked) is used for every layer when given; otherwise each
        layer type gets its Gemma mask built from `input_ids` (see the module docstring).
        """
        given = sorted(k for k, v in unsupported.items() if v is not None and k in _UNSUPPORTED_FORWARD_ARGS)
        unknown = sorted(k for k in unsupported if k not in _UNSUPPORTED_FORWARD_ARGS)
        if given or unknown:
            raise NotImplementedError(f"Gemma4Model.forward does not support {given + unknown}")
        self.stage_state.reset()
        self._unpack_carry()
        if decoder_input is None and self.pre_process:
            decoder_input = self._embed(input_ids, pixel_values, image_position_ids, input_features,
                                        input_features_mask)
        hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
        seq, batch = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, seq)
        if attention_mask is None:
            attention_mask = self._masks(input_ids, seq, batch, hidden.device)
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=self.gemma4_rotary(position_ids),
            padding_mask=padding_mask,
        )
        if not self.post_process:
            return self._pack_carry(hidden_states)
        return self._logits_or_loss(hidden_states, labels, runtime_gather_output)

    def _embed(self, input_ids: Tensor, pixel_values, image_position_ids, input_features, input_features_mask):
        """Word embedding [s, b, h] times sqrt(hidden) (rounded to the embedding dtype, as HF), soft tokens
        scattered in, and the per-layer inputs of PLE left in the stage state."""
        mm = self.multimodal
        text_ids = input_ids
        if mm is not None and mm.token_ids:
            soft = torch.isin(input_ids, torch.tensor(mm.token_ids, device=input_ids.device))
            text_ids = torch.where(soft, mm.pad_token_id, input_ids)
        embedded = self.embedding(input_ids=text_ids, position_ids=None)
        embedded = embedded * _scale(self.config.hidden_size**0.5, embedded)
        if pixel_values is not None:
            features = image_soft_tokens(self.multimodal.towers, pixel_values, image_position_ids)
            embedded = _scatter(embedded, input_ids == mm.image_token_id, features, "image")
        if input_features is not None:
            features = audio_soft_tokens(self.multimodal.towers, input_features, input_features_mask)
            embedded = _scatter(embedded, input_ids == mm.audio_token_id, features, "audio")
        if self.config.per_layer_input_size:
            self.stage_state.per_layer_inputs = self._per_layer_inputs(text_ids, embedded)
        return embedded

    def _per_layer_inputs(self, text_ids: Tensor, embedded: Tensor) -> Tensor:
        """PLE inputs [s, b, L, P] for every layer (transformers' get_per_layer_inputs + project_per_layer_inputs)."""
        config, width = self.config, self.config.per_layer_input_size
        table = self.per_layer_embedding(text_ids.transpose(0, 1).contiguous())
        table = (table * _scale(width**0.5, table)).unflatten(-1, (config.num_layers, width))
        projected = self.per_layer_model_projection(embedded) * config.hidden_size**-0.5
        projected = self.per_layer_projection_norm(projected.unflatten(-1, (config.num_layers, width)))
        return (projected + table) * 2.0**-0.5

    def _masks(self, input_ids: Tensor | None, seq: int, batch: int, device) -> dict[str, Tensor]:
        """{layer type: bool mask [b, 1, s, s], True = masked}."""
        q = torch.arange(seq, device=device)[:, None]
        k = torch.arange(seq, device=device)[None, :]
        causal = (k <= q).expand(batch, seq, seq)
        masks = {}
        for layer_type in set(self.config.layer_types):
            allowed = causal
            if layer_type == SLIDING:
                window = self.config.window_size[0] + 1
                blocks = self._image_blocks(input_ids)
                if blocks is not None:
                    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
                    allowed = causal | same
                allowed = allowed & (k > q - window)
            masks[layer_type] = ~allowed.unsqueeze(1)
        return masks

    def _image_blocks(self, input_ids: Tensor | None) -> Tensor | None:
        """[b, s]: the index of the image each vision token belongs to (runs of image / video ids), -1 elsewhere;
        None when the config does not attend bidirectionally within images or there are none."""
        mm = self.multimodal
        if mm is None or input_ids is None or not self.config.bidirectional_vision:
            return None
        vision = torch.isin(input_ids, torch.tensor([t for t in (mm.image_token_id, mm.video_token_id)
                                                     if t is not None], device=input_ids.device))
        if not vision.any():
            return None
        starts = vision & ~torch.nn.functional.pad(vision[:, :-1], (1, 0), value=False)
        return torch.where(vision, torch.cumsum(starts.int(), dim=1) - 1, -1)

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


def _scale(value: float, like: Tensor) -> Tensor:
    """A scalar rounded to `like`'s dtype first (HF's scaled embeddings multiply by the cast scale)."""
    return torch.tensor(value, dtype=torch.float32).to(like.dtype).to(like.device)


def _scatter(embedded: Tensor, positions: Tensor, features: Tensor, what: str) -> Tensor:
    """`embedded` [s, b, h] with the rows at `positions` [b, s] (batch-major order, as HF) replaced by `features`."""
    if int(positions.sum()) != features.shape[0]:
        raise ValueError(f"{int(positions.sum())} {what} tokens but {features.shape[0]} {what} soft tokens")
    batch_major = embedded.transpose(0, 1).clone()
    batch_major[positions] = features.to(batch_major.dtype)
    return batch_major.transpose(0, 1)

