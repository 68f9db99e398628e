"""Local <-> global Megatron names, read off the model's own module tree.

A pipeline stage (or virtual stage) names its layers `decoder.layers.0..k-1`; each layer module knows its global
`layer_number` (1-based), so uneven splits and virtual stages come for free. An expert-parallel rank names its
experts `...experts.local_experts.0..m-1`; the MoE layer that owns them lists their global indices in
`local_expert_indices`. A tensor's global name is its local name with those two kinds of path segment replaced.

That is how specbridge's own builders name things (`build.build_chunks` marks its chunks, `BUILT_HERE`). A model
the user built (megatron-core's local or TransformerEngine layer spec, SequentialMLP or grouped experts) is named
through its own `sharded_state_dict()` instead: each tensor's checkpoint key and the global offsets megatron-core
prepends to it (layer, expert) give the spec's name, whatever modules hold the tensor (`checkpoint_names`). The
spec names the local layer spec's tensors; the TE spec's fused norms are the same tensors under other keys
(`TE_NORM_KEYS`).
"""

from __future__ import annotations

import torch

# chunks built by specbridge (named by their module tree) carry this attribute
BUILT_HERE = "_specbridge_built"
# checkpoint key (below a layer) of a norm TransformerEngine fuses into the next linear -> the spec's name for it
# (megatron-core's local spec writes its norms under the same keys: `sharded_state_dict_keys_map`)
TE_NORM_KEYS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
# megatron-core keys every expert's tensors (SequentialMLP's and grouped experts' alike) under `mlp.experts.experts.`
# with the global expert index as a prepended axis
LAYERS, EXPERTS, LOCAL_EXPERTS = "decoder.layers.", "mlp.experts.experts.", "mlp.experts.local_experts."

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


def global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local tensor name -> the spec's global name: by the module tree for specbridge's own models, by the
    model's sharded state dict for any other."""
    return local_to_global(model) if getattr(model, BUILT_HERE, False) else checkpoint_names(model)


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Local tensor name -> the spec's global name, read off `model.sharded_state_dict()`: each tensor's checkpoint
    key with the layer and expert offsets megatron-core prepends (`decoder.layers.mlp.experts.experts.linear_fc1.weight`
    at (3, 5) is
    `decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`, whether a SequentialMLP expert's
    `weight` or a grouped linear's `weight5` holds it)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_id = {id(t): name for name, t in named_tensors(model).items()}
    out = {}
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):  # e.g. a gated fc1 under TP: its parts carry the offsets
            parts = [t for t in nested_values(item.build()) if isinstance(t, ShardedTensor)]
            first = parts[0] if parts else None
        else:
            first = item if isinstance(item, ShardedTensor) else None
        local = by_id.get(id(item.data)) if first is not None else None
        if local is not None:
            out[local] = spec_name(item.key, tuple(first.global_offset[:first.prepend_axis_num]))
    return out


def stacked_axes(key: str) -> int:
    """How many axes megatron-core prepends to the tensors of checkpoint key `key`: the layer of a stacked decoder
    key (`decoder.layers.X`), and the expert of an experts key (`…mlp.experts.experts.X`); none otherwise."""
    if not key.startswith(LAYERS):
        return 0
    head, _, tail = key[len(LAYERS):].partition(".")
    rest = tail if head.isdigit() else key[len(LAYERS):]
    experts = rest.startswith(EXPERTS) and not rest[len(EXPERTS):].partition(".")[0].isdigit()
    return (0 if head.isdigit() else 1) + experts


def spec_name(key: str, offsets: tuple[int, ...]) -> str:
    """The spec's name of checkpoint key `key` at prepended offsets: (layer[, expert]) for a stacked key
    `decoder.layers.X`, (expert,) or none for a per-layer key `decoder.layers.{i}.X` (megatron-core keys layers
    separately when they differ, e.g. dense and MoE layers mixed)."""
    if not key.startswith(LAYERS):
        return key
    head, _, tail = key[len(LAYERS):].partition(".")
    if head.isdigit():
        layer, rest, offsets = int(head), tail, (None, *offsets)
    elif offsets:
        layer, rest = offsets[0], key[len(LAYERS):]
    else:
        return key
    for fused, norm in TE_NORM_KEYS.items():
        if rest.startswith(fused):
            rest = norm + rest[len(fused):]
    if rest.startswith(EXPERTS) and len(offsets) > 1:
        rest = f"{LOCAL_EXPERTS}{offsets[1]}.{rest[len(EXPERTS):]}"
    elif rest.startswith(EXPERTS):  # one key per expert (`singleton_local_shards`)
        rest = LOCAL_EXPERTS + rest[len(EXPERTS):]
    return f"{LAYERS}{layer}.{rest}"
