"""Who holds and who writes what, for one rank's `Topology`.

`tp_of` is the tensor parallel group that splits a mapping's tensor (the expert-TP group for experts).
`writes` picks the one rank that writes each HF tensor: `owner` spreads the writing of replicated tensors over
data-parallel replicas and of expert groups over EP ranks. `local_tensors` names this rank's tensors globally.
`checkpoint_share` splits an export from a checkpoint, where every rank can read every tensor, by bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

from ..compiler import ir
from .naming import global_names, named_tensors
from .parallel import Topology


def tp_of(topology: Topology, mapping: ir.Mapping) -> tuple[int, int]:
    """(rank, size) in the tensor parallel group that splits this mapping's tensor."""
    if mapping.expert is not None:
        return topology.etp_rank, topology.etp_size
    return topology.tp_rank, topology.tp_size


def writes(topology: Topology, mapping: ir.Mapping) -> bool:
    """The one rank that writes this tensor. Dense tensors: TP rank 0 of one data-parallel replica, chosen per
    tensor so replicas share the writing. Experts: expert-TP rank 0 of the first expert-data-parallel replica, on
    the EP rank chosen for the (layer, rule) group."""
    if mapping.expert is not None:
        return (topology.etp_rank == 0 and topology.expert_dp_rank == 0
                and topology.ep_rank == owner(mapping, topology.ep_size))
    return topology.tp_rank == 0 and topology.dp_rank == owner(mapping, topology.dp_size)


def writes_in_place(topology: Topology, mapping: ir.Mapping, sharded: bool) -> bool:
    """This rank writes its own tensor of `mapping` in place (`direct_write`): one data-parallel replica
    (expert-data-parallel for experts) does, each TP rank its slice of a split tensor, and of a tensor not split by
    TP one TP rank chosen by name."""
    rank, size = tp_of(topology, mapping)
    if mapping.expert is not None:
        replica = topology.expert_dp_rank == 0
    else:
        replica = topology.dp_rank == owner(mapping, topology.dp_size)
    return replica and (sharded or rank == zlib.crc32(mapping.mcore.encode()) % size)


def owner(mapping: ir.Mapping, size: int) -> int:
    """A deterministic spread of tensors (expert groups: of (layer, rule)) over `size` ranks."""
    key = f"{mapping.layer}/{mapping.rule}" if mapping.expert is not None else mapping.mcore
    return zlib.crc32(key.encode()) % size


def local_tensors(chunks: Iterable[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Global Megatron name -> this rank's tensor, over every model chunk (virtual pipeline stages)."""
    out = {}
    for chunk in chunks:
        names = global_names(chunk)
        for local, tensor in named_tensors(chunk).items():
            out[names.get(local, local)] = tensor  # unnamed: reported by the importer as unfilled
    return out


def checkpoint_share(groups: Iterable[list[ir.Mapping]], nbytes, rank: int, size: int) -> set[str]:
    """The Megatron names rank `rank` of `size` exports when every rank reads what it writes (from a checkpoint):
    whole export groups, the largest first, each to the least loaded rank (`nbytes(name)`: a tensor's size; every
    rank computes the same split)."""
    groups = [(sum(nbytes(m.mcore) for m in group), [m.mcore for m in group]) for group in groups]
    load, mine = [0] * size, set()
    for total, names in sorted(groups, key=lambda g: -g[0]):
        least = min(range(size), key=load.__getitem__)
        load[least] += total
        if least == rank:
            mine.update(names)
    return mine
