"""Local <-> global Megatron names, from the model's own structure.

A pipeline stage names its layers `decoder.layers.0..k-1`; the global index is the layer module's
`layer_number - 1` (so uneven splits and virtual stages come for free). An expert-parallel rank names its experts
`local_experts.0..m-1`; the global index is `ep_rank * m + j`.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by local name (no `_extra_state` entries)."""
    state = model.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def layer_offsets(model: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global layer index (0-based), read from each layer's `layer_number`."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None) or []
    return {k: layer.layer_number - 1 for k, layer in enumerate(layers)}


def local_to_global(model: torch.nn.Module, ep_rank: int = 0) -> dict[str, str]:
    layers = layer_offsets(model)
    out = {}
    for local in named_tensors(model):
        name = _LAYER.sub(lambda m: f"decoder.layers.{layers[int(m.group(1))]}.", local, count=1)
        out[local] = _EXPERT.sub(lambda m: f".local_experts.{_global_expert(model, local, m, ep_rank)}.", name)
    return out


def _global_expert(model, local_name: str, match: re.Match, ep_rank: int) -> int:
    experts_path = local_name[:match.start()] + ".local_experts"
    local_experts = model.get_submodule(experts_path)
    return ep_rank * len(local_experts) + int(match.group(1))

# megatron-core keeps a copy of a tied embedding as the output layer's weight on the last pipeline stage (PP > 1)
TIED_OUTPUT = "output_layer.weight"
