"""Export (Megatron -> HF): convert this rank's tensors back and hand each HF tensor to one writer.

Mappings are walked in the plan's order, the experts of one (layer, rule) as one group. A tensor-parallel tensor
is gathered only inside its TP group (expert-TP group for experts), to that group's first rank; experts one local
expert at a time inside their EP group, to the EP rank that writes the group. One designated rank per tensor
converts it (derived program: split, absent-part checks, casts) and hands the HF tensors to its own shard
writer; slices of fused expert tensors are written in place as they arrive. Errors are agreed on by all ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..compiler import ir
from ..errors import ConversionError
from . import collector, parallel
from .collectives import agree
from .ops import cast, run_export
from .parallel import Topology
from .placement import local_tensors, owner, tp_of, writes
from .tp import concat_on_dim0, tp_concat


@dataclass
class Traffic:
    """What this process's exports moved, for the tests: bytes it sent into another rank's gather, bytes it wrote
    in place from its own tensors (`direct_write`), and how many of those went out direct (O_DIRECT)."""

    gathered_bytes: int = 0
    placed_bytes: int = 0
    placed_direct_bytes: int = 0


stats = Traffic()


def _gather_to_root(local: torch.Tensor, group, size: int, root_in_group: int = 0,
                    into: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """Every member's tensor, on one member only (the group's first by default; None elsewhere); with `into`
    (on that member), gathered straight into its dim-0 chunks."""
    import torch.distributed as dist

    root = dist.get_global_rank(group, root_in_group)
    if dist.get_rank() != root:
        shards = None
        stats.gathered_bytes += local.numel() * local.element_size()
    elif into is not None:
        shards = list(into.chunk(size, dim=0))
    else:
        shards = [torch.empty_like(local) for _ in range(size)]
    dist.gather(local.contiguous(), shards, dst=root, group=group)
    return shards


def gather_tp(local: torch.Tensor, mapping: ir.Mapping, topology: Topology, vocab_rows: int | None):
    """The full tensor on the TP group's first rank (expert-TP group for experts), None on the others: gathered
    only within the tensor's own group, and only to the rank that converts it (vocab padding dropped)."""
    rank, size = tp_of(topology, mapping)
    if size == 1 or mapping.shard.kind == "replicated":
        shards = [local] if rank == 0 else None
    elif concat_on_dim0(mapping, size):  # gathered in place: no concatenation
        full = local.new_empty((size * local.shape[0], *local.shape[1:])) if rank == 0 else None
        group = parallel.tp_group(expert=mapping.expert is not None)
        if _gather_to_root(local, group, size, into=full) is None:
            return None
        return full[:vocab_rows] if mapping.shard.kind == "vocab" and vocab_rows is not None else full
    else:
        shards = _gather_to_root(local, parallel.tp_group(expert=mapping.expert is not None), size)
    if shards is None:
        return None
    return tp_concat(shards, mapping, vocab_rows if mapping.shard.kind == "vocab" else None)


def gather_ep(tensors: list[torch.Tensor], topology: Topology, root: int = 0) -> list[torch.Tensor] | None:
    """Every EP rank's tensors, on EP rank `root` (None elsewhere)."""
    if topology.ep_size == 1:
        return tensors
    blocks = _gather_to_root(torch.stack(tensors), parallel.ep_group(), topology.ep_size, root)
    return None if blocks is None else [t for block in blocks for t in block.unbind(0)]


def group_key(mapping: ir.Mapping):
    """The export group of a mapping: the experts of one (layer, rule) are one group, every other tensor its own."""
    return mapping.layer, mapping.rule, mapping.expert is None and mapping.mcore


def export_groups(plan: ir.Plan):
    """The plan's mappings in order, the experts of one (layer, rule) together."""
    for _, group in itertools.groupby(plan.mappings, key=group_key):
        yield list(group)


def export_weights(chunks, plan: ir.Plan, sink, topology: Topology = Topology(), hf_dtype: torch.dtype | None = None,
                   check_absent: bool = True, progress=None) -> int:
    """Convert every mapping whose Megatron tensor lives on this rank (`chunks`: the model chunks, or a mapping
    of global names to tensors, e.g. a checkpoint's read directly); on its designated rank each HF tensor goes to
    `sink.add(key, tensor, owned)`, each slice of a stacked HF tensor to `sink.add_slice(key, index, length,
    tensor)` (a `CheckpointWriter`). Errors are agreed on by all ranks at the end (no rank is left waiting in a
    gather). Returns the number of HF tensors this rank completed."""
    steps = export_steps(chunks, plan, sink, topology, hf_dtype, check_absent, progress)
    with collector.paused():
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value


def export_steps(chunks, plan: ir.Plan, sink, topology: Topology = Topology(), hf_dtype: torch.dtype | None = None,
                 check_absent: bool = True, progress=None):
    """`export_weights` as a generator: yields once after each group has been handed to the sink (so a caller
    can drain the sink in between); every rank must run it to the end. Returns the count `export_weights` does."""
    params = {} if isinstance(chunks, Mapping) else local_tensors(chunks)  # the model's own memory
    tensors = chunks if isinstance(chunks, Mapping) else params
    vocab_rows = plan.model_kwargs().get("vocab_size")
    lengths = dict(plan.stacks)
    emitted, error = 0, None
    for group in export_groups(plan):
        with torch.no_grad():
            for mapping, full in _gathered(group, tensors, topology, vocab_rows):
                if error is not None or not writes(topology, mapping):
                    continue
                try:
                    emitted += _emit(mapping, full, tensors, params.get(mapping.mcore), lengths, sink, hf_dtype,
                                     check_absent)
                except ConversionError as exc:
                    error = exc.located(rank=topology.rank)
        if progress is not None:
            progress(len(group))
        yield
    if error is None and sink.open_stacks():
        error = ConversionError(f"stacked tensors incomplete after export: {sink.open_stacks()}", rank=topology.rank)
    agree(error)
    return emitted


def _gathered(group: list[ir.Mapping], tensors: dict, topology: Topology, vocab_rows):
    """(mapping, full Megatron tensor) for the group's tensors that reach this rank: gathered within the TP group
    to its first rank, and for experts, one local expert at a time, within the EP group to the group's writing
    rank (which holds one expert per EP rank besides the stack being assembled)."""
    local = [m for m in group if m.mcore in tensors]
    for j, mapping in enumerate(local):
        full = gather_tp(tensors[mapping.mcore].detach(), mapping, topology, vocab_rows)
        if full is None:
            continue  # not the first rank of this tensor's TP group
        if mapping.expert is None:
            yield mapping, full
            continue
        pieces = gather_ep([full], topology, root=owner(mapping, topology.ep_size))
        for ep_rank, piece in enumerate(pieces or ()):
            yield group[ep_rank * len(local) + j], piece


def _emit(mapping, full, tensors, local, lengths, sink, hf_dtype, check_absent) -> int:
    """Run the derived program on one full Megatron tensor and hand its HF tensors to the sink; `local` is the
    model's parameter (None for an expert gathered from another EP rank, or a tensor read from a checkpoint): an
    HF tensor sharing its memory is not owned by the sink."""
    parts = run_export(mapping, full, read=lambda k: tensors[k], hf_dtype=hf_dtype, check_absent=check_absent)
    count = 0
    for source in mapping.sources:
        tensor = cast(parts[source.part], hf_dtype) if hf_dtype is not None else parts[source.part]
        if source.index is not None:
            count += sink.add_slice(source.key, source.index, lengths[source.key], tensor)
            continue
        owned = local is None or tensor.untyped_storage().data_ptr() != local.untyped_storage().data_ptr()
        sink.add(source.key, tensor, owned=owned)
        count += 1
    return count
