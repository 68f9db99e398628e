"""Import (HF -> Megatron): fill every local tensor of this rank's model chunks from an HF checkpoint.

Every local tensor is filled by exactly one mapping. A rank reads only the bytes it owns: for a tensor-parallel
tensor, the row ranges of each HF part that make up its slice of the sharded axis (whole query groups for QKV,
`[gate_r; up_r]` for GLU fc1, a vocab row range) or a column range (row-parallel); for an expert-parallel rank
only its experts; for a pipeline stage only its layers. Problems found before reading (a local tensor no rule
fills, a missing or unknown key, an axis that does not divide by TP) and while reading are agreed on by all
ranks, so every rank ends with the same error naming key, rule and rank.
"""

from __future__ import annotations

import dataclasses

import torch

from ..compiler import ir
from ..compiler.layouts import LayoutError, dim_of_axis, part_rows, split_shapes
from ..compiler.ops import row as op_row
from ..errors import ConversionError
from . import collector, tp
from .collectives import agree
from .direct_read import DirectReader
from .naming import TIED_OUTPUT
from .ops import cast, run_import
from .parallel import Topology
from .placement import local_tensors, tp_of


def verify_checkpoint_keys(plan: ir.Plan, available: set[str]) -> None:
    """Every key the plan needs is there, and every key there is known to the plan."""
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


def verify_tied_sentinels(plan: ir.Plan, reader, rows: int = 4096) -> None:
    """An HF tensor the spec calls a tied copy (e.g. `lm_head.weight` under `tie_word_embeddings`) that the
    checkpoint holds anyway must equal the tensor it is tied to, bit for bit: otherwise the conversion would drop
    real weights. Compared `rows` rows at a time."""
    by_mcore = plan.by_mcore()
    for sentinel in plan.sentinels:
        tied_to = by_mcore.get(sentinel.reason)
        if sentinel.side != ir.HF or sentinel.kind != "tied" or sentinel.key not in reader.keys() or tied_to is None:
            continue
        other = tied_to.sources[0].key
        shape = reader.shape(sentinel.key)
        same = shape == reader.shape(other) and reader.dtype(sentinel.key) == reader.dtype(other) and (
            torch.equal(reader.get(sentinel.key), reader.get(other)) if not shape else
            all(torch.equal(reader.get(sentinel.key, rows=(r, min(r + rows, shape[0]))),
                            reader.get(other, rows=(r, min(r + rows, shape[0])))) for r in range(0, shape[0], rows)))
        if not same:
            raise ConversionError(f"the config ties '{sentinel.key}' to '{other}', but the checkpoint holds a "
                                  f"different '{sentinel.key}': converting would drop it (set the config's "
                                  f"tie_word_embeddings to false to convert it untied)", key=sentinel.key,
                                  rule=sentinel.span)


def tied_copies(plan: ir.Plan) -> dict[str, str]:
    """Megatron's copy of a tied tensor on the last pipeline stage -> the tensor it copies."""
    if any(s.kind == "tied" and s.reason == "embedding.word_embeddings.weight" for s in plan.sentinels):
        return {TIED_OUTPUT: "embedding.word_embeddings.weight"}
    return {}


def _assignments(plan: ir.Plan, targets: dict, topology: Topology) -> dict[str, ir.Mapping]:
    """Local name -> the mapping that fills it; raises for a tensor no rule fills."""
    by_mcore = plan.by_mcore()
    skipped = {s.key for s in plan.sentinels if s.side == ir.MCORE}
    copies = tied_copies(plan)
    out = {}
    for name in targets:
        mapping = by_mcore.get(copies.get(name, name))
        if mapping is None:
            if name in skipped:
                continue
            raise ConversionError(f"Megatron tensor '{name}' would stay unfilled: no rule of spec '{plan.spec}' "
                                  f"produces it", key=name, rank=topology.rank)
        out[name] = mapping
    return out


def import_weights(chunks, plan: ir.Plan, reader, topology: Topology = Topology(), progress=None) -> int:
    """Fill every local tensor of `chunks` from `reader`. Returns the number of tensors filled on this rank."""
    targets = local_tensors(chunks)
    error, work = None, {}
    try:
        verify_checkpoint_keys(plan, reader.keys())
        verify_tied_sentinels(plan, reader)
        work = _assignments(plan, targets, topology)
        for name, mapping in work.items():
            _check_divisible(mapping, reader, topology)
    except ConversionError as exc:
        error = exc
    agree(error)
    try:
        with torch.no_grad(), collector.paused(), DirectReader(reader) as direct:
            for name, mapping in work.items():
                _fill_one(targets[name], mapping, reader, direct, topology)
                if progress is not None:
                    progress(1)
    except ConversionError as exc:
        error = exc.located(rank=topology.rank)
    agree(error)
    return len(work)


def _fill_one(target: torch.Tensor, mapping: ir.Mapping, reader, direct: DirectReader, topology: Topology) -> None:
    """Fill `target` by direct reads where its mapping allows, else through the general path."""
    try:
        placed = direct.fill(target, mapping, *tp_of(topology, mapping))
    except ConversionError as exc:
        raise exc.located(key=mapping.mcore, rule=mapping.span, rank=topology.rank) from None
    if not placed:
        _fill(target, mapping, reader, topology)


def _part_shape(reader, source: ir.Source) -> tuple[int, ...]:
    """The shape of one HF part (one slice of a stacked tensor)."""
    return reader.shape(source.key)[1 if source.index is not None else 0:]


def _part_shapes(mapping: ir.Mapping, reader) -> dict[str, tuple[int, ...]]:
    """The shape of each part the Megatron layout fuses (an HF-side layout's parts for a fused HF tensor)."""
    shapes = {s.part: _part_shape(reader, s) for s in mapping.sources}
    if mapping.hf_layout is None:
        return shapes
    try:
        return split_shapes(mapping.hf_layout, next(iter(shapes.values())))
    except LayoutError as exc:
        raise ConversionError(f"hf tensor of shape {list(next(iter(shapes.values())))}: {exc}",
                              key=mapping.sources[0].key, rule=mapping.span) from None


def _check_divisible(mapping: ir.Mapping, reader, topology: Topology) -> None:
    rank, size = tp_of(topology, mapping)
    if size == 1 or mapping.shard.kind != "axis" or mapping.shard.axis is None:
        return
    what, extent = tp.shard_extent(mapping, size, _part_shapes(mapping, reader))
    if extent % size:
        layer = f" (layer {mapping.layer})" if mapping.layer is not None else ""
        raise ConversionError(f"{what} of '{mapping.mcore}'{layer} has size {extent}, which tensor parallel size "
                              f"{size} does not divide", key=mapping.mcore, rule=mapping.span, rank=topology.rank)


def _fill(target: torch.Tensor, mapping: ir.Mapping, reader, topology: Topology) -> None:
    rank, size = tp_of(topology, mapping)
    try:
        local = _build_local(mapping, reader, rank, size, tuple(target.shape))
    except ConversionError as exc:
        raise exc.located(key=mapping.mcore, rule=mapping.span, rank=topology.rank) from None
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"cannot build '{mapping.mcore}': {exc}", key=mapping.mcore, rule=mapping.span,
                              rank=topology.rank) from None
    if tuple(local.shape) != tuple(target.shape):
        raise ConversionError(f"shape mismatch: the spec gives {list(local.shape)} for this rank, the Megatron "
                              f"tensor is {list(target.shape)}", key=mapping.mcore, rule=mapping.span,
                              rank=topology.rank)
    target.copy_(cast(local, target.dtype))  # a dtype change keeps NaN payloads


def _build_local(mapping: ir.Mapping, reader, rank: int, size: int, target_shape) -> torch.Tensor:
    """This rank's slice of the Megatron tensor, reading only the HF bytes it needs where the layout allows. A vocab
    tensor's rows past the real vocabulary are padding: zeros, never read."""
    shard = mapping.shard
    if shard.kind == "vocab":
        if len(mapping.sources) == 1 and not mapping.hf_to_mcore:
            return _read_vocab_rows(mapping.sources[0], reader, rank, target_shape)
        full = run_import(mapping, _read_parts(mapping, reader), read=reader.get)
        return tp.tp_slice(full, mapping, rank, size, padded_rows=target_shape[0] * size)
    if size == 1 or shard.kind == "replicated":
        return run_import(mapping, _read_parts(mapping, reader), read=reader.get)
    if shard.kind == "axis" and _row_shardable(mapping, size):
        return _import_rows(mapping, reader, rank, size)
    if shard.kind == "axis" and mapping.layout is None and shard.dim == 1 and not mapping.hf_to_mcore:
        (source,) = mapping.sources
        return reader.get(source.key, source.index, cols=tp.column_range(rank, target_shape[1]))
    full = run_import(mapping, _read_parts(mapping, reader), read=reader.get)
    return tp.tp_slice(full, mapping, rank, size)


def _read_parts(mapping: ir.Mapping, reader) -> dict[str, torch.Tensor]:
    return {s.part: reader.get(s.key, s.index) for s in mapping.sources}


def _read_vocab_rows(source: ir.Source, reader, rank: int, target_shape) -> torch.Tensor:
    """Rank's rows of a vocab tensor: the real rows it holds, read from disk, then zero rows of padding."""
    rows = target_shape[0]
    start, stop = tp.vocab_row_range(rank, rows, _part_shape(reader, source)[0])
    real = reader.get(source.key, source.index, rows=(start, stop)) if start < stop else None
    if real is not None and real.shape[0] == rows:
        return real
    pad = torch.zeros((rows - (stop - start), *target_shape[1:]), dtype=reader.entry(source.key)[1].dtype)
    return pad if real is None else torch.cat([real, pad])


def _row_shardable(mapping: ir.Mapping, size: int) -> bool:
    """The sharded axis lies in dim 0 of every part, and no op needs the whole tensor."""
    if any(op_row(op).sharding == "whole" for op in mapping.hf_to_mcore):
        return False
    if mapping.layout is None:
        return mapping.shard.dim == 0
    if mapping.hf_layout is not None and mapping.hf_layout.dims[0][:1] != (ir.BRACKET,):
        return False  # the HF tensor's parts are not blocks of rows (see `layouts.part_rows`)
    return dim_of_axis(mapping.layout, mapping.shard.axis) == 0 and not tp.below_tp(mapping, size)


def _import_rows(mapping: ir.Mapping, reader, rank: int, size: int) -> torch.Tensor:
    local = tp.localized(mapping, size)
    if mapping.hf_layout is None:
        parts = {s.part: _read_part_rows(mapping, s, reader, rank, size) for s in mapping.sources}
        return run_import(local, parts, read=reader.get)
    # a fused HF tensor whose parts are blocks of rows: each part's rows of this rank, read as a part
    (source,) = mapping.sources
    shape = _part_shape(reader, source)
    parts = {part: _read_part_rows(mapping, source, reader, rank, size, part, (start, shape))
             for part, (start, _) in part_rows(mapping.hf_layout, shape).items()}
    program = tuple(op for op in local.hf_to_mcore if not isinstance(op, ir.SplitSource))
    return run_import(dataclasses.replace(local, hf_to_mcore=program), parts, read=reader.get)


def _read_part_rows(mapping: ir.Mapping, source: ir.Source, reader, rank: int, size: int, part: str | None = None,
                    within: tuple[int, tuple[int, ...]] | None = None) -> torch.Tensor:
    """The rows of one HF part that hold this rank's chunk of the sharded axis; `within` = (first row, shape of
    the whole tensor) when the part is a block of rows of a fused HF tensor."""
    part = part or source.part
    if within is None:
        offset, shape = 0, _part_shape(reader, source)
    else:
        offset, shape = within[0], split_shapes(mapping.hf_layout, within[1])[part]
    ranges = tp.part_row_ranges(mapping, part, shape, rank, size)
    pieces = [reader.get(source.key, source.index, rows=(offset + a, offset + b)) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
