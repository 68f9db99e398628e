"""Gemma 4's vision and audio towers inside the Megatron model, their soft tokens, and inputs that exercise them.

Contract:
- `multimodal_parts(hf_config, config, build_towers)` answers None for a text-only config (`Gemma4TextConfig`:
  `Gemma4ForCausalLM`), else `MultimodalParts` for a `Gemma4Config` (`Gemma4ForConditionalGeneration`): the
  token ids soft tokens replace, the pad id they are embedded as, and (when `build_towers`, i.e. on the first
  pipeline stage) transformers' own tower modules, built from the HF sub-configs, named as in the checkpoint
  without its `model.` prefix (`vision_tower`, `embed_vision`, `audio_tower`, `embed_audio`). megatron-core has no
  Gemma 4 vision or audio encoder; the towers are replicated across TP and run in the parameters' dtype.
- `image_soft_tokens(towers, pixel_values, image_position_ids)` / `audio_soft_tokens(towers, features, mask)`:
  the [N, hidden] rows that replace the image / audio tokens, in order, computed as transformers'
  `Gemma4Model.get_image_features` / `get_audio_features` do (padding stripped).
- `sample_inputs(hf_config, ids, generator)`: for parity, one image and one audio clip per sequence (as the
  checkpoint has towers), their soft-token ids written into `ids`, and the tensors both models take.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

TOWERS = {"vision_config": ("vision_tower", "embed_vision"), "audio_config": ("audio_tower", "embed_audio")}


@dataclasses.dataclass
class MultimodalParts:
    image_token_id: int | None
    video_token_id: int | None
    audio_token_id: int | None
    pad_token_id: int
    towers: dict[str, torch.nn.Module]

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t for t in (self.image_token_id, self.video_token_id, self.audio_token_id) if t is not None)


def is_multimodal(hf_config) -> bool:
    return getattr(hf_config, "model_type", None) == "gemma4"


def multimodal_parts(hf_config, config, build_towers: bool) -> MultimodalParts | None:
    if not is_multimodal(hf_config):
        return None
    text = hf_config.get_text_config()
    towers = {}
    if build_towers:
        for field, (tower_name, embedder_name) in TOWERS.items():
            sub = getattr(hf_config, field, None)
            if sub is not None:
                towers[tower_name], towers[embedder_name] = _tower(sub, text, config.params_dtype)
    return MultimodalParts(hf_config.image_token_id, getattr(hf_config, "video_token_id", None),
                           hf_config.audio_token_id, text.pad_token_id or 0, towers)


def _tower(sub_config, text_config, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    import transformers
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder

    tower = transformers.AutoModel.from_config(sub_config)
    embedder = Gemma4MultimodalEmbedder(sub_config, text_config)
    return tower.to(dtype).eval(), embedder.to(dtype).eval()


def image_soft_tokens(towers: dict, pixel_values: Tensor, image_position_ids: Tensor) -> Tensor:
    if "vision_tower" not in towers:
        raise ValueError("pixel_values given, but this model has no vision tower")
    hidden = towers["vision_tower"](pixel_values=pixel_values, pixel_position_ids=image_position_ids).last_hidden_state
    return towers["embed_vision"](inputs_embeds=hidden)


def audio_soft_tokens(towers: dict, input_features: Tensor, input_features_mask: Tensor) -> Tensor:
    if "audio_tower" not in towers:
        raise ValueError("input_features given, but this model has no audio tower")
    out = towers["audio_tower"](input_features, input_features_mask, return_dict=True)
    return towers["embed_audio"](inputs_embeds=out.last_hidden_state)[out.attention_mask]


@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """Inputs for both models: `ids` [b, s] with soft-token ids in place; `rows[k]` the Megatron forward's extra
    keyword arguments for sequence k (one micro-batch each); `hf` transformers' extra keyword arguments for the
    whole batch; `modalities` what is fed ("text", "image", "audio")."""

    ids: Tensor
    rows: tuple[dict, ...]
    hf: dict
    modalities: tuple[str, ...]


def sample_inputs(hf_config, ids: Tensor, generator: torch.Generator) -> SampleInputs:
    """Random images / audio for every tower the config has, one of each per sequence, tokens after position 0."""
    batch, seq = ids.shape
    ids = ids.clone()
    rows: list[dict] = [{} for _ in range(batch)]
    hf: dict = {}
    modalities = ["text"]
    if not is_multimodal(hf_config):
        return SampleInputs(ids, tuple(rows), hf, tuple(modalities))
    special = torch.tensor([t for t in (hf_config.image_token_id, getattr(hf_config, "video_token_id", None),
                                        hf_config.audio_token_id) if t is not None])
    ids[torch.isin(ids, special)] = 1 if 1 not in special else 2  # random text must not hit a soft-token id
    types = torch.zeros_like(ids)
    start = 1
    if hf_config.vision_config is not None:
        pixels, positions, count = _images(hf_config.vision_config, batch, generator)
        ids[:, start:start + count] = hf_config.image_token_id
        types[:, start:start + count] = 1
        start += count
        hf.update(pixel_values=pixels, image_position_ids=positions)
        for k, row in enumerate(rows):
            row.update(pixel_values=pixels[k:k + 1], image_position_ids=positions[k:k + 1])
        modalities.append("image")
    if hf_config.audio_config is not None:
        features, mask, count = _audio(hf_config.audio_config, batch, generator)
        ids[:, start:start + count] = hf_config.audio_token_id
        types[:, start:start + count] = 3
        start += count
        hf.update(input_features=features, input_features_mask=mask)
        for k, row in enumerate(rows):
            row.update(input_features=features[k:k + 1], input_features_mask=mask[k:k + 1])
        modalities.append("audio")
    if start >= seq:
        raise ValueError(f"a sequence of {seq} tokens has no room for {start - 1} soft tokens and text")
    hf["mm_token_type_ids"] = types
    return SampleInputs(ids, tuple(rows), hf, tuple(modalities))


def _images(vision_config, batch: int, generator) -> tuple[Tensor, Tensor, int]:
    """A square grid of 2k x 2k patches per image (k = pooling kernel): 4 soft tokens each."""
    k = vision_config.pooling_kernel_size
    side = 2 * k
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0).expand(batch, -1, -1).contiguous()
    pixels = torch.rand(batch, side * side, 3 * vision_config.patch_size**2, generator=generator)
    return pixels, positions, (side * side) // (k * k)


def _audio(audio_config, batch: int, generator) -> tuple[Tensor, Tensor, int]:
    """16 frames of `subsampling_conv_channels[0]` features (two stride-2 convolutions: 4 soft tokens), all valid."""
    frames = 16
    features = torch.randn(batch, frames, audio_config.subsampling_conv_channels[0], generator=generator)
    return features, torch.ones(batch, frames, dtype=torch.bool), frames // 4
