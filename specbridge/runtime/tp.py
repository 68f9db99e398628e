"""Tensor parallelism on one tensor: which slice of a full Megatron tensor each TP rank holds, and back.

Contract, for a mapping `m` and a TP group of `size` ranks:
- `tp_slice(full, m, rank, size)` is rank's shard and `tp_concat([tp_slice(full, m, r, size) for r], m)` is
  `full` again, bit for bit. An `axis` shard cuts the layout axis `m.shard.axis` into `size` equal chunks (whole
  query groups for QKV, `[gate_r; up_r]` for a GLU fc1) and leaves every other factor whole; without a layout
  axis it cuts dim `m.shard.dim`. When the axis has fewer entries than ranks (`below_tp`: 1 KV group on TP 2)
  megatron-core cuts the whole dim evenly instead, through the group, and so do these functions.
- A `vocab` shard cuts dim 0 after padding it with zero rows to the padded vocabulary (`padded_vocab_size`, as
  Megatron pads: a multiple of 128 x TP); `tp_concat` drops the padding again when told the real vocabulary.
- The row-range arithmetic the importer reads by: `part_row_ranges` gives the rows of one HF part that make up
  rank's slice (one range per outer factor), `localized` the mapping as one rank sees it (the sharded axis's
  bound size divided by TP), `vocab_row_range` the real rows of a vocab shard (the rest is padding), and
  `shard_extent` the size TP must divide.
All of it is views, `chunk` and `cat`: nothing is computed, so round trips are exact.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..compiler import ir
from ..compiler.layouts import LayoutError, axis_position, factored_shape, infer_sizes
from ..errors import ConversionError

VOCAB_DIVISIBLE_BY = 128  # megatron's `make_vocab_size_divisible_by` default


def padded_vocab_size(vocab: int, tp_size: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """The vocabulary Megatron builds for `vocab` tokens at tensor parallel size `tp_size`: the next multiple of
    `divisible_by * tp_size` (extra rows are padding, never a token)."""
    multiple = divisible_by * tp_size
    return -(-vocab // multiple) * multiple


def below_tp(mapping: ir.Mapping, size: int) -> bool:
    """The sharded axis has fewer entries than TP ranks (e.g. 1-2 KV groups on a TP of 2-4). megatron-core then
    splits the whole dim evenly, cutting through the group, and all-gathers the projection's output."""
    shard, layout = mapping.shard, mapping.layout
    extent = layout.size(shard.axis) if layout is not None and shard.axis is not None else None
    return extent is not None and extent < size


def _axis_view(tensor: torch.Tensor, mapping: ir.Mapping, size: int) -> tuple[torch.Tensor, int]:
    """A view of `tensor` with what TP cuts as a dim of its own, and that dim's position."""
    shard, layout = mapping.shard, mapping.layout
    if layout is None or shard.axis is None or below_tp(mapping, size):
        return tensor, shard.dim
    sizes = infer_sizes(layout, tuple(tensor.shape))
    return tensor.reshape(factored_shape(layout, sizes)), axis_position(layout, shard.axis)


def tp_slice(tensor: torch.Tensor, mapping: ir.Mapping, rank: int, size: int,
             padded_rows: int | None = None) -> torch.Tensor:
    """Rank `rank`'s shard of a full Megatron tensor (a vocab tensor is zero-padded to `padded_rows` first)."""
    shard = mapping.shard
    if shard.kind == "vocab":
        if padded_rows is not None and padded_rows > tensor.shape[0]:
            tensor = torch.cat([tensor, tensor.new_zeros((padded_rows - tensor.shape[0], *tensor.shape[1:]))])
        return _chunk(tensor, 0, rank, size, mapping, "the padded vocabulary")
    if shard.kind == "replicated" or size == 1:
        return tensor
    view, dim = _axis_view(tensor, mapping, size)
    cut = f"dim {shard.dim}" if view is tensor else f"axis '{shard.axis}'"
    out_shape = list(tensor.shape)
    out_shape[shard.dim] //= size
    return _chunk(view, dim, rank, size, mapping, cut).reshape(out_shape)


def _chunk(tensor: torch.Tensor, dim: int, rank: int, size: int, mapping: ir.Mapping, what: str) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ConversionError(f"{what} of size {tensor.shape[dim]} does not divide by tensor parallel size {size}",
                              key=mapping.mcore, rule=mapping.span)
    return tensor.chunk(size, dim=dim)[rank]


def concat_on_dim0(mapping: ir.Mapping, size: int) -> bool:
    """Whether `tp_concat` is a plain concatenation along dim 0 (each shard is then a contiguous block of the full
    tensor, which a gather can fill in place; a vocab tensor is then cut back to the real vocabulary)."""
    shard = mapping.shard
    if shard.kind == "vocab":
        return True
    if shard.kind == "replicated" or size == 1:
        return False
    return shard.dim == 0 and (mapping.layout is None or shard.axis is None or below_tp(mapping, size))


def tp_concat(shards: list[torch.Tensor], mapping: ir.Mapping, vocab_rows: int | None = None) -> torch.Tensor:
    """Inverse of `tp_slice`: the full tensor from every rank's shard, in rank order (a vocab tensor is cut back
    to `vocab_rows`, the real vocabulary, when given)."""
    shard = mapping.shard
    if shard.kind == "vocab":
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
        return full[:vocab_rows] if vocab_rows is not None else full
    if shard.kind == "replicated" or len(shards) == 1:
        return shards[0]
    size = len(shards)
    if mapping.layout is None or shard.axis is None or below_tp(mapping, size):
        return torch.cat(shards, dim=shard.dim)
    full_shape = list(shards[0].shape)
    full_shape[shard.dim] *= size
    sizes = infer_sizes(mapping.layout, tuple(full_shape))
    local_sizes = dict(sizes, **{shard.axis: sizes[shard.axis] // size})
    views = [s.reshape(factored_shape(mapping.layout, local_sizes)) for s in shards]
    return torch.cat(views, dim=axis_position(mapping.layout, shard.axis)).reshape(full_shape)


# ---------------------------------------------------------------- row ranges (what a rank reads)


def _dim_factors(mapping: ir.Mapping, dim: int, sizes: dict, part: str | None) -> tuple[int, ...]:
    """The sizes of the factors of layout dim `dim`, for one part (or the fused tensor when `part` is None)."""
    extents = dict(mapping.layout.parts)
    bracket = extents.get(part) if part is not None else sum(extents.values())
    return tuple(bracket if f == ir.BRACKET else sizes[f] for f in mapping.layout.dims[dim])


def shard_extent(mapping: ir.Mapping, size: int, part_shapes: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    """What TP cuts for an `axis` shard and its full size, from the HF parts' shapes: the layout axis, or the
    whole sharded dim when the axis has fewer entries than ranks."""
    shard, layout = mapping.shard, mapping.layout
    sizes = dict(layout.sizes)
    for part, shape in part_shapes.items():
        try:
            sizes.update(infer_sizes(layout, shape, part))
        except LayoutError as exc:
            raise ConversionError(f"part '{part}' of shape {list(shape)}: {exc}", key=mapping.mcore,
                                  rule=mapping.span) from None
    if below_tp(mapping, size):
        return f"dim {shard.dim}", math.prod(_dim_factors(mapping, shard.dim, sizes, None))
    return f"axis '{shard.axis}'", sizes[shard.axis]


def part_row_ranges(mapping: ir.Mapping, part: str, shape: tuple[int, ...], rank: int,
                    size: int) -> list[tuple[int, int]]:
    """The row ranges `[start, stop)` of HF part `part` (of shape `shape`) that hold rank's chunk of the sharded
    axis, which lies in dim 0: one range per entry of the factors outside the axis, in order."""
    if mapping.layout is None:
        factors, position = (shape[0],), 0
    else:
        factors = _dim_factors(mapping, 0, infer_sizes(mapping.layout, shape, part), part)
        position = mapping.layout.dims[0].index(mapping.shard.axis) if mapping.shard.axis else 0
    outer, extent, inner = math.prod(factors[:position]), factors[position], math.prod(factors[position + 1:])
    chunk = extent // size
    return [((o * extent + rank * chunk) * inner, (o * extent + (rank + 1) * chunk) * inner) for o in range(outer)]


def localized(mapping: ir.Mapping, size: int) -> ir.Mapping:
    """The mapping as seen by one TP rank: the sharded axis's bound size divided by the TP size, so that fusing
    the rank's rows of each part gives the rank's shard."""
    if mapping.layout is None:
        return mapping
    axis = mapping.shard.axis
    layout = dataclasses.replace(mapping.layout, sizes=tuple((k, v // size if k == axis else v)
                                                             for k, v in mapping.layout.sizes))
    program = tuple(ir.Fuse(layout) if isinstance(op, ir.Fuse) else op for op in mapping.hf_to_mcore)
    return dataclasses.replace(mapping, hf_to_mcore=program)


def vocab_row_range(rank: int, rows_per_rank: int, vocab: int) -> tuple[int, int]:
    """The real rows `[start, stop)` of rank's vocab shard (empty when the shard is all padding); the shard's
    other `rows_per_rank - (stop - start)` rows are padding."""
    start = min(rank * rows_per_rank, vocab)
    return start, min((rank + 1) * rows_per_rank, vocab)


def column_range(rank: int, columns_per_rank: int) -> tuple[int, int]:
    """The columns `[start, stop)` of a row-parallel (dim 1) tensor that rank holds."""
    return rank * columns_per_rank, (rank + 1) * columns_per_rank
