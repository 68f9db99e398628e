"""The checkpoint keys of a TransformerEngine (TE) layer-spec model, written from specbridge's local-spec model.

A megatron-core checkpoint names tensors by their place in the model, not by the modules holding them: the local
spec already writes its norms under the TE spec's fused keys (`input_layernorm.` as
`self_attention.linear_qkv.layer_norm_`, a dense layer's `pre_mlp_layernorm.` as `mlp.linear_fc1.layer_norm_`), and
SequentialMLP's experts under the keys grouped experts use (`mlp.experts.experts.linear_fc1.weight` with a global
expert axis). Two differences remain, and `te_sharded_state_dict` makes them:

- a MoE layer's `pre_mlp_layernorm` is a module of its own in the TE spec (`pre_mlp_layernorm.weight`), while the
  local spec still writes it as `mlp.linear_fc1.layer_norm_weight` (Megatron-LM #6270);
- every TE module has an `_extra_state` entry (its FP8 metadata): the linears (megatron-core's local linears
  write one too, holding None), the norms TE implements (final, MoE pre-MLP, q/k norms; TE >= 2 norms carry
  one), each expert's linears along the expert axis. Without
  FP8 the state is "none" (`NO_FP8`, the pickled `None` TE 1.x and 2.x both load; TE 2.x itself writes an empty
  byte tensor). A TE version whose norms keep no extra state ignores those entries (Megatron-LM's default
  `--dist-ckpt-strictness assume_ok_unexpected`); a missing one would fail its load.

The TE key set is proved against megatron-core's own TE spec and wrappers, built on a TE stand-in that names
tensors only (`tests/te_standin.py`, `tests/runtime/test_te_keys.py`). Loading back (`specbridge export`) renames
a MoE norm where the checkpoint holds the TE key (so checkpoints of either layer spec, and of earlier versions,
load); the extra state is not asked for by a local-spec model.
"""

from __future__ import annotations

import pickle

import torch

LAYER_SPECS = ("te", "local")
EXTRA_STATE = "_extra_state"
# modules that TE implements in a TE-spec GPT model (the last segment of their path)
TE_MODULES = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "q_layernorm", "k_layernorm",
              "pre_mlp_layernorm", "final_layernorm"}
LOCAL_MOE_NORM, TE_MOE_NORM = "mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."


def no_fp8_state() -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8)


def te_sharded_state_dict(chunk, sharded: dict, topology, extra_state: bool = True, present=None) -> dict:
    """`sharded` (the local-spec `chunk`'s `sharded_state_dict()`) with the TE spec's keys: MoE norms renamed (only
    where the checkpoint has the TE key, when `present` gives its keys) and, with `extra_state`, the
    `_extra_state` objects of the TE modules added. Changed in place and returned."""
    moe_norms = _moe_norm_tensors(chunk)
    for item in sharded.values():
        if id(getattr(item, "data", None)) in moe_norms and LOCAL_MOE_NORM in item.key:
            renamed = item.key.replace(LOCAL_MOE_NORM, TE_MOE_NORM)
            if present is None or renamed in present:
                item.key = renamed
    if extra_state:
        sharded.update(_extra_states(sharded.values(), topology))
    return sharded


def _moe_norm_tensors(chunk) -> set[int]:
    """ids of the pre-MLP norm tensors of MoE layers (a layer whose MLP has a router)."""
    out = set()
    for module in chunk.modules():
        norm, mlp = getattr(module, "pre_mlp_layernorm", None), getattr(module, "mlp", None)
        if norm is not None and hasattr(mlp, "router"):
            out.update(id(p) for p in norm.parameters())
    return out


def _extra_states(items, topology) -> dict:
    """One `_extra_state` object per TE module and (layer, expert) place, keyed like its weight."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    items = list(items)
    # megatron-core's local linears keep an (empty) extra state of their own, for TE compatibility
    have = {(i.key, tuple(i.global_offset)) for i in items if isinstance(i, ShardedObject)}
    out = {}
    for item in items:
        module = _te_module(item.key)
        placed = _prepended(item) if module is not None else None
        if placed is None:
            continue
        shape, offset, replica = placed
        key = f"{module}.{EXTRA_STATE}"
        if (key, offset) in have:
            continue
        tp_rank = topology.etp_rank if ".experts." in key else topology.tp_rank
        dp_rank = replica[2] if isinstance(replica, tuple) and len(replica) == 3 else 0  # (E)DP: as the weight's
        out.setdefault(f"{key}@{offset}", ShardedObject(key, no_fp8_state(), shape, offset, (0, tp_rank, dp_rank)))
    return out


def _te_module(key: str) -> str | None:
    """The TE module a weight key belongs to (a fused norm's weight belongs to its linear), or None."""
    for suffix in (".layer_norm_weight", ".weight"):
        if key.endswith(suffix):
            module = key[:-len(suffix)]
            return module if module.rpartition(".")[2] in TE_MODULES else None
    return None


def _prepended(item):
    """(global shape, offset, replica id) of the axes megatron-core prepends to a tensor (layer, expert); (1,), (0,)
    for a tensor with none. A factory (e.g. a gated fc1 under TP) is read through the tensors it builds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(item, ShardedTensorFactory):
        built = [t for t in nested_values(item.build()) if isinstance(t, ShardedTensor)]
        item = built[0] if built else None
    if not isinstance(item, ShardedTensor):
        return None
    n = item.prepend_axis_num
    if n == 0:
        return (1,), (0,), item.replica_id
    return tuple(item.global_shape[:n]), tuple(item.global_offset[:n]), item.replica_id
