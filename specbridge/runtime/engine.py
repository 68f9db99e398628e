"""Executing a checked `Plan` on Megatron model chunks: import (HF -> Megatron) and export (Megatron -> HF).

Import: every local tensor of every model chunk on this rank is filled by exactly one mapping; the HF tensors
it needs are read lazily, and only the rank's slice is copied in. A local tensor with no rule, a missing or
unknown HF key, or a shape mismatch is a `ConversionError` naming key, rule and rank, raised before any write.

Export: mappings are walked in the plan's order (layer by layer). A tensor-parallel tensor is gathered only
inside its TP group (expert TP group for experts); one rank per group (tp rank 0) converts it and hands the HF
tensors to the writer. Stacked HF tensors (fused experts) are assembled one layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..compiler import ir
from .naming import local_to_global, named_tensors
from .ops import ConversionError, run_export, run_import, tp_concat, tp_slice


@dataclass(frozen=True, slots=True)
class Ranks:
    """The slice of the parallel layout the engine needs (all 0/1 in a single process)."""

    rank: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    dp_rank: int = 0

    @classmethod
    def from_topology(cls, t) -> "Ranks":
        return cls(t.rank, t.tp_rank, t.tp_size, t.ep_rank, t.ep_size, t.etp_rank, t.etp_size, t.dp_rank)

    def tp_of(self, mapping: ir.Mapping) -> tuple[int, int]:
        return (self.etp_rank, self.etp_size) if mapping.expert is not None else (self.tp_rank, self.tp_size)


def local_tensors(chunks: Iterable[torch.nn.Module], ranks: Ranks) -> dict[str, torch.Tensor]:
    """Global Megatron name -> this rank's tensor, over every model chunk (virtual pipeline stages)."""
    out = {}
    for chunk in chunks:
        names = local_to_global(chunk, ranks.ep_rank)
        for local, tensor in named_tensors(chunk).items():
            out[names[local]] = tensor
    return out


# ---------------------------------------------------------------- import


def verify_checkpoint_keys(plan: ir.Plan, available: set[str]) -> None:
    """Before reading: every key the plan needs is there, and every key there is known to the plan."""
    needed = {s.key: m for m in plan.mappings for s in m.sources}
    for key, m in needed.items():
        if key not in available:
            raise ConversionError(f"the checkpoint has no tensor '{key}' needed for '{m.mcore}'", key=key, rule=m.span)
    known = set(needed) | {s.key for s in plan.sentinels if s.side == ir.HF}
    unknown = sorted(available - known)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ConversionError(f"the checkpoint has tensor '{unknown[0]}'{more}, which no rule of spec "
                              f"'{plan.spec}' ({plan.architecture}, format '{plan.format}') consumes", key=unknown[0])


def import_weights(chunks, plan: ir.Plan, reader, ranks: Ranks = Ranks(), progress=None) -> int:
    """Fill every local tensor of `chunks` from `reader`. Returns the number of tensors filled."""
    verify_checkpoint_keys(plan, reader.keys())
    targets = local_tensors(chunks, ranks)
    by_mcore = plan.by_mcore()
    skipped = {s.key for s in plan.sentinels if s.side == ir.MCORE}
    for name in targets:
        if name not in by_mcore and name not in skipped:
            raise ConversionError(f"Megatron tensor '{name}' would stay unfilled: no rule of spec '{plan.spec}' "
                                  f"produces it", key=name, rank=ranks.rank)
    filled = 0
    with torch.no_grad():
        for name, target in targets.items():
            mapping = by_mcore.get(name)
            if mapping is None:
                continue
            _fill(target, mapping, reader, ranks)
            filled += 1
            if progress is not None:
                progress(1)
    return filled


def _fill(target: torch.Tensor, mapping: ir.Mapping, reader, ranks: Ranks) -> None:
    parts = {s.part: reader.get(s.key, s.index) for s in mapping.sources}
    try:
        full = run_import(mapping, parts, read=reader.get)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"cannot build '{mapping.mcore}': {exc}", key=mapping.mcore, rule=mapping.span,
                              rank=ranks.rank) from None
    rank, size = ranks.tp_of(mapping)
    padded = target.shape[0] * size if mapping.shard.kind == "vocab" else None
    local = tp_slice(full, mapping, rank, size, padded)
    if tuple(local.shape) != tuple(target.shape):
        raise ConversionError(f"shape mismatch: the spec gives {list(local.shape)} for this rank, the Megatron "
                              f"tensor is {list(target.shape)}", key=mapping.mcore, rule=mapping.span, rank=ranks.rank)
    target.copy_(local)


# ---------------------------------------------------------------- export


class _Stacks:
    """Collects the slices of stacked HF tensors; hands each one over when complete."""

    def __init__(self, plan: ir.Plan):
        self.lengths = dict(plan.stacks)
        self.slices: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, key: str, index: int, tensor: torch.Tensor):
        slices = self.slices.setdefault(key, {})
        slices[index] = tensor
        if len(slices) == self.lengths[key]:
            del self.slices[key]
            return torch.stack([slices[i] for i in range(self.lengths[key])])
        return None


def gather_tp(local: torch.Tensor, mapping: ir.Mapping, ranks: Ranks, vocab_rows: int | None) -> torch.Tensor:
    """The full tensor, gathered only within the tensor's own TP group (expert TP group for experts)."""
    rank, size = ranks.tp_of(mapping)
    if size == 1 or mapping.shard.kind == "replicated":
        shards = [local]
    else:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        group = ps.get_expert_tensor_parallel_group() if mapping.expert is not None else \
            ps.get_tensor_model_parallel_group()
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local.contiguous(), group=group)
    return tp_concat(shards, mapping, vocab_rows if mapping.shard.kind == "vocab" else None)


def export_weights(chunks, plan: ir.Plan, emit, ranks: Ranks = Ranks(), hf_dtype: torch.dtype | None = None,
                   check_absent: bool = True, progress=None) -> int:
    """Convert every mapping whose Megatron tensor lives on this rank; `emit(key, tensor)` receives each HF
    tensor on the designated rank (TP rank 0 of the owning group). Returns the number of tensors emitted."""
    tensors = local_tensors(chunks, ranks)
    vocab_rows = plan.model_kwargs().get("vocab_size")
    stacks = _Stacks(plan)
    emitted = 0
    with torch.no_grad():
        for mapping in plan.mappings:
            local = tensors.get(mapping.mcore)
            if local is None:
                continue
            full = gather_tp(local.detach(), mapping, ranks, vocab_rows)
            if ranks.tp_of(mapping)[0] != 0:
                continue
            parts = run_export(mapping, full, read=lambda k: tensors[k], hf_dtype=hf_dtype, check_absent=check_absent)
            for source in mapping.sources:
                tensor = parts[source.part].to(hf_dtype) if hf_dtype is not None else parts[source.part]
                if source.index is not None:
                    tensor = stacks.add(source.key, source.index, tensor)
                    if tensor is None:
                        continue
                emit(source.key, tensor)
                emitted += 1
            if progress is not None:
                progress(1)
    if stacks.slices:
        raise ConversionError(f"stacked tensors incomplete after export: {sorted(stacks.slices)}", rank=ranks.rank)
    return emitted
