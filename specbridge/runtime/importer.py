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
import math

import torch

from ..compiler import ir
from ..compiler.layouts import dim_of_axis, infer_sizes
from ..compiler.ops import row as op_row
from .collectives import agree
from .direct_read import DirectReader
from .naming import TIED_OUTPUT
from ..errors import ConversionError
from .ops import below_tp, cast, run_import, tp_slice
from .placement import Ranks, local_tensors


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


def _assignments(plan: ir.Plan, targets: dict, ranks: Ranks) -> dict[str, ir.Mapping]:
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
                                  f"produces it", key=name, rank=ranks.rank)
        out[name] = mapping
    return out


def import_weights(chunks, plan: ir.Plan, reader, ranks: Ranks = Ranks(), progress=None) -> int:
    """Fill every local tensor of `chunks` from `reader`. Returns the number of tensors filled on this rank."""
    targets = local_tensors(chunks, ranks)
    error, work = None, {}
    try:
        verify_checkpoint_keys(plan, reader.keys())
        verify_tied_sentinels(plan, reader)
        work = _assignments(plan, targets, ranks)
        for name, mapping in work.items():
            _check_divisible(mapping, reader, ranks)
    except ConversionError as exc:
        error = exc
    agree(error)
    try:
        with torch.no_grad(), DirectReader(reader) as direct:
            for name, mapping in work.items():
                if not direct.fill(targets[name], mapping, *ranks.tp_of(mapping)):
                    _fill(targets[name], mapping, reader, ranks)
                if progress is not None:
                    progress(1)
    except ConversionError as exc:
        error = exc
    agree(error)
    return len(work)


def _check_divisible(mapping: ir.Mapping, reader, ranks: Ranks) -> None:
    rank, size = ranks.tp_of(mapping)
    if size == 1 or mapping.shard.kind != "axis" or mapping.shard.axis is None:
        return
    axis = mapping.shard.axis
    extent = mapping.layout.size(axis)
    if extent is None:
        source = mapping.sources[0]
        shape = reader.shape(source.key)[1 if source.index is not None else 0:]
        extent = infer_sizes(mapping.layout, shape, source.part)[axis]
    if below_tp(mapping, size):
        extent = math.prod(_fused_dim(mapping, reader))
        axis = f"dim {mapping.shard.dim}"
    if extent % size:
        layer = f" (layer {mapping.layer})" if mapping.layer is not None else ""
        raise ConversionError(f"axis '{axis}' of '{mapping.mcore}'{layer} has size {extent}, which tensor "
                              f"parallel size {size} does not divide", key=mapping.mcore, rule=mapping.span,
                              rank=ranks.rank)


def _fused_dim(mapping: ir.Mapping, reader) -> tuple[int, ...]:
    """The factor sizes of the fused tensor's sharded dim, from the HF parts' shapes."""
    sizes = dict(mapping.layout.sizes)
    for s in mapping.sources:
        sizes.update(infer_sizes(mapping.layout, reader.shape(s.key)[1 if s.index is not None else 0:], s.part))
    extents = dict(mapping.layout.parts)
    dim = mapping.layout.dims[mapping.shard.dim]
    return tuple(sum(extents.values()) if f == ir.BRACKET else sizes[f] for f in dim)


def _fill(target: torch.Tensor, mapping: ir.Mapping, reader, ranks: Ranks) -> None:
    rank, size = ranks.tp_of(mapping)
    try:
        local = _build_local(mapping, reader, rank, size, tuple(target.shape))
    except ConversionError as exc:
        raise exc.located(key=mapping.mcore, rule=mapping.span, rank=ranks.rank) from None
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"cannot build '{mapping.mcore}': {exc}", key=mapping.mcore, rule=mapping.span,
                              rank=ranks.rank) from None
    if tuple(local.shape) != tuple(target.shape):
        raise ConversionError(f"shape mismatch: the spec gives {list(local.shape)} for this rank, the Megatron "
                              f"tensor is {list(target.shape)}", key=mapping.mcore, rule=mapping.span, rank=ranks.rank)
    target.copy_(cast(local, target.dtype))  # a dtype change keeps NaN payloads


def _build_local(mapping: ir.Mapping, reader, rank: int, size: int, target_shape) -> torch.Tensor:
    """This rank's slice of the Megatron tensor, reading only the HF bytes it needs where the layout allows."""
    shard = mapping.shard
    if size == 1 or shard.kind == "replicated":
        return run_import(mapping, _read_parts(mapping, reader), read=reader.get)
    if shard.kind == "vocab" and len(mapping.sources) == 1 and not mapping.hf_to_mcore:
        return _read_vocab_rows(mapping.sources[0], reader, rank, target_shape)
    if shard.kind == "axis" and _row_shardable(mapping, size):
        return _import_rows(mapping, reader, rank, size)
    if shard.kind == "axis" and mapping.layout is None and shard.dim == 1 and not mapping.hf_to_mcore:
        (source,) = mapping.sources
        chunk = target_shape[1]
        return reader.get(source.key, source.index, cols=(rank * chunk, (rank + 1) * chunk))
    full = run_import(mapping, _read_parts(mapping, reader), read=reader.get)
    return tp_slice(full, mapping, rank, size, target_shape[0] * size if shard.kind == "vocab" else None)


def _read_parts(mapping: ir.Mapping, reader) -> dict[str, torch.Tensor]:
    return {s.part: reader.get(s.key, s.index) for s in mapping.sources}


def _read_vocab_rows(source: ir.Source, reader, rank: int, target_shape) -> torch.Tensor:
    rows = target_shape[0]
    vocab = reader.shape(source.key)[0]
    start, stop = rank * rows, min((rank + 1) * rows, vocab)
    tensor = reader.get(source.key, source.index, rows=(start, stop)) if start < stop else None
    if tensor is not None and tensor.shape[0] == rows:
        return tensor
    pad = torch.zeros((rows - (0 if tensor is None else tensor.shape[0]), *target_shape[1:]),
                      dtype=reader_dtype(reader, source.key))
    return pad if tensor is None else torch.cat([tensor, pad])


def reader_dtype(reader, key: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return table.get(reader.dtype(key), torch.float32)


def _row_shardable(mapping: ir.Mapping, size: int) -> bool:
    """The sharded axis lies in dim 0 of every part, and no op needs the whole tensor."""
    if any(op_row(op).sharding == "whole" for op in mapping.hf_to_mcore):
        return False
    if mapping.layout is None:
        return mapping.shard.dim == 0
    return dim_of_axis(mapping.layout, mapping.shard.axis) == 0 and not below_tp(mapping, size)


def _import_rows(mapping: ir.Mapping, reader, rank: int, size: int) -> torch.Tensor:
    parts = {s.part: _read_part_rows(mapping, s, reader, rank, size) for s in mapping.sources}
    return run_import(_localized(mapping, size), parts, read=reader.get)


def _read_part_rows(mapping: ir.Mapping, source: ir.Source, reader, rank: int, size: int) -> torch.Tensor:
    """The rows of one HF part that hold this rank's chunk of the sharded axis (one range per outer index)."""
    shape = reader.shape(source.key)[1 if source.index is not None else 0:]
    if mapping.layout is None:
        factors, position = (shape[0],), 0
    else:
        sizes = infer_sizes(mapping.layout, shape, source.part)
        dim0 = mapping.layout.dims[0]
        factors = tuple(dict(mapping.layout.parts)[source.part] if f == ir.BRACKET else sizes[f] for f in dim0)
        position = dim0.index(mapping.shard.axis) if mapping.shard.axis else 0
    outer, extent, inner = math.prod(factors[:position]), factors[position], math.prod(factors[position + 1:])
    chunk = extent // size
    ranges = [((o * extent + rank * chunk) * inner, (o * extent + (rank + 1) * chunk) * inner) for o in range(outer)]
    pieces = [reader.get(source.key, source.index, rows=r) for r in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _localized(mapping: ir.Mapping, size: int) -> ir.Mapping:
    """The mapping as seen by one TP rank: the sharded axis's bound size divided by the TP size."""
    if mapping.layout is None:
        return mapping
    axis = mapping.shard.axis
    layout = dataclasses.replace(mapping.layout, sizes=tuple((k, v // size if k == axis else v)
                                                             for k, v in mapping.layout.sizes))
    program = tuple(ir.Fuse(layout) if isinstance(op, ir.Fuse) else op for op in mapping.hf_to_mcore)
    return dataclasses.replace(mapping, hf_to_mcore=program)
