"""Local <-> global Megatron names, read off the model's own module tree.

A pipeline stage (or virtual stage) names its layers `decoder.layers.0..k-1`; each layer module knows its global
`layer_number` (1-based), so uneven splits and virtual stages come for free. An expert-parallel rank names its
experts `...experts.local_experts.0..m-1`; the MoE layer that owns them lists their global indices in
`local_expert_indices`. A tensor's global name is its local name with those two kinds of path segment replaced.
"""

from __future__ import annotations

import torch

# megatron-core keeps a copy of a tied embedding as the output layer's weight on the last pipeline stage (PP > 1)
TIED_OUTPUT = "output_layer.weight"


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by local name (no `_extra_state` entries)."""
    state = model.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _global_indices(model: torch.nn.Module) -> dict[int, list[int]]:
    """id(module list) -> the global index of each of its entries: the decoder's layers and every MoE layer's
    local experts."""
    out = {}
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is not None:
        out[id(layers)] = [layer.layer_number - 1 for layer in layers]
    for module in model.modules():
        experts = getattr(getattr(module, "experts", None), "local_experts", None)
        if experts is not None and hasattr(module, "local_expert_indices"):
            out[id(experts)] = list(module.local_expert_indices)
    return out


def module_paths(model: torch.nn.Module) -> dict[str, str]:
    """Local module path -> global module path, for every module of `model`."""
    renumbered = _global_indices(model)
    paths, modules = {"": ""}, {"": model}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        parent, _, leaf = name.rpartition(".")
        indices = renumbered.get(id(modules[parent]))
        segment = str(indices[int(leaf)]) if indices is not None else leaf
        paths[name] = f"{paths[parent]}.{segment}" if parent else segment
        modules[name] = module
    return paths


def local_to_global(model: torch.nn.Module) -> dict[str, str]:
    """Local tensor name -> global tensor name, for every tensor of `named_tensors(model)`."""
    paths = module_paths(model)
    out = {}
    for local in named_tensors(model):
        module, _, leaf = local.rpartition(".")
        out[local] = f"{paths.get(module, module)}.{leaf}" if module else leaf
    return out
