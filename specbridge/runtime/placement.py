"""Who holds and who writes what: this rank's place in the parallel layout, as the import and export need it.

`Ranks` is read from megatron-core's `parallel_state` (all 0/1 in a single process). `local_tensors` names this
rank's tensors globally (layer from `layer_number`, expert from `ep_rank * local_experts + j`). `owner` spreads
the writing of replicated tensors over data-parallel replicas and of expert groups over EP ranks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..compiler import ir
from .naming import local_to_global, named_tensors


@dataclass(frozen=True, slots=True)
class Ranks:
    """The slice of the parallel layout import and export need (all 0/1 in a single process)."""

    rank: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    dp_rank: int = 0
    expert_dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """Read from megatron-core's parallel_state (must be initialised)."""
        from .parallel import current_topology

        t = current_topology()
        return cls(t.rank, t.tp_rank, t.tp_size, t.ep_rank, t.ep_size, t.etp_rank, t.etp_size, t.dp_rank,
                   t.expert_dp_rank, t.dp_size)

    def tp_of(self, mapping: ir.Mapping) -> tuple[int, int]:
        return (self.etp_rank, self.etp_size) if mapping.expert is not None else (self.tp_rank, self.tp_size)

    def writes(self, mapping: ir.Mapping) -> bool:
        """The one rank that writes this tensor. Dense tensors: TP rank 0 of one data-parallel replica, chosen per
        tensor so replicas share the writing. Experts: expert-TP rank 0 of the first expert-data-parallel replica,
        on the EP rank chosen for the (layer, rule) group."""
        if mapping.expert is not None:
            return self.etp_rank == 0 and self.expert_dp_rank == 0 and self.ep_rank == owner(mapping, self.ep_size)
        return self.tp_rank == 0 and self.dp_rank == owner(mapping, self.dp_size)


def owner(mapping: ir.Mapping, size: int) -> int:
    """A deterministic spread of tensors (expert groups: of (layer, rule)) over `size` ranks."""
    key = f"{mapping.layer}/{mapping.rule}" if mapping.expert is not None else mapping.mcore
    return zlib.crc32(key.encode()) % size


def local_tensors(chunks: Iterable[torch.nn.Module], ranks: Ranks) -> dict[str, torch.Tensor]:
    """Global Megatron name -> this rank's tensor, over every model chunk (virtual pipeline stages)."""
    out = {}
    for chunk in chunks:
        names = local_to_global(chunk, ranks.ep_rank)
        for local, tensor in named_tensors(chunk).items():
            out[names[local]] = tensor
    return out
