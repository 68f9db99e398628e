"""Tensor kernels for the IR ops, and the interpreter of a mapping's two programs.

`run_import(mapping, parts)` turns the HF tensors of one mapping into the full Megatron tensor;
`run_export(mapping, tensor)` turns a full Megatron tensor back into its HF parts (asserting absent parts still
follow their policy). `tp_slice` / `tp_concat` cut and rebuild a tensor-parallel shard along the spec's axis.
All kernels are views, `cat`s and exact elementwise ops: round trips are bit-exact unless an op is declared
inexact (`Mapping.exact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..compiler import ir
from ..compiler.layouts import axis_position, bracket_position, factored_shape, infer_sizes, shape_of
from ..errors import ConversionError


# ---------------------------------------------------------------- layout kernels


def _sizes_from_parts(layout: ir.Layout, parts: dict[str, torch.Tensor]) -> dict[str, int]:
    sizes = dict(layout.sizes)
    for name, tensor in parts.items():
        sizes.update(infer_sizes(layout, tuple(tensor.shape), name))
    return sizes


def fuse(layout: ir.Layout, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    sizes = _sizes_from_parts(layout, parts)
    axis = bracket_position(layout)
    if axis is None:
        (only,) = parts.values()
        return only.reshape(shape_of(layout, sizes))
    pieces = [parts[name].reshape(factored_shape(layout, sizes, name)) for name in layout.part_names]
    return torch.cat(pieces, dim=axis).reshape(shape_of(layout, sizes))


def split(layout: ir.Layout, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    sizes = infer_sizes(layout, tuple(tensor.shape))
    axis = bracket_position(layout)
    if axis is None:
        (name,) = layout.part_names or ("x",)
        return {name: tensor}
    extents = [extent for _, extent in layout.parts]
    pieces = tensor.reshape(factored_shape(layout, sizes)).split(extents, dim=axis)
    return {name: piece.reshape(shape_of(layout, sizes, name)).contiguous()
            for name, piece in zip(layout.part_names, pieces)}


def zeros_for(layout: ir.Layout, part: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    sizes = _sizes_from_parts(layout, parts)
    like = next(iter(parts.values()))
    return torch.zeros(shape_of(layout, sizes, part), dtype=like.dtype)


# ---------------------------------------------------------------- tensor parallel slices


def _axis_view(tensor: torch.Tensor, mapping: ir.Mapping) -> tuple[torch.Tensor, int]:
    """A view of `tensor` with the sharded axis as its own dim, and that dim's position."""
    shard, layout = mapping.shard, mapping.layout
    if layout is None or shard.axis is None:
        return tensor, shard.dim
    sizes = infer_sizes(layout, tuple(tensor.shape))
    return tensor.reshape(factored_shape(layout, sizes)), axis_position(layout, shard.axis)


def below_tp(mapping: ir.Mapping, size: int) -> bool:
    """The sharded axis has fewer entries than TP ranks (e.g. 1-2 KV groups on a TP of 2-4). megatron-core then
    splits the whole dim evenly, cutting through the group, and all-gathers the projection's output."""
    shard, layout = mapping.shard, mapping.layout
    extent = layout.size(shard.axis) if layout is not None and shard.axis is not None else None
    return extent is not None and extent < size


def tp_slice(tensor: torch.Tensor, mapping: ir.Mapping, rank: int, size: int, padded_rows: int | None = None):
    """The rank's shard of a full Megatron tensor (vocab shards are zero-padded to `padded_rows` first)."""
    shard = mapping.shard
    if shard.kind == "replicated" or size == 1 and shard.kind != "vocab":
        return tensor
    if shard.kind == "vocab":
        if padded_rows is not None and padded_rows > tensor.shape[0]:
            pad = tensor.new_zeros((padded_rows - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        return tensor.chunk(size, dim=0)[rank] if size > 1 else tensor
    view, dim = (tensor, shard.dim) if below_tp(mapping, size) else _axis_view(tensor, mapping)
    if view.shape[dim] % size:
        raise ConversionError(f"axis '{shard.axis or shard.dim}' of size {view.shape[dim]} does not divide by "
                              f"tensor parallel size {size}", key=mapping.mcore, rule=mapping.span)
    local = view.chunk(size, dim=dim)[rank]
    out_shape = list(tensor.shape)
    out_shape[shard.dim] //= size
    return local.reshape(out_shape)


def tp_concat(shards: list[torch.Tensor], mapping: ir.Mapping, vocab_rows: int | None = None) -> torch.Tensor:
    """Inverse of `tp_slice`: the full tensor from every rank's shard (vocab padding removed)."""
    shard = mapping.shard
    if shard.kind == "replicated" or len(shards) == 1 and shard.kind != "vocab":
        return shards[0]
    if shard.kind == "vocab":
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
        return full[:vocab_rows] if vocab_rows is not None else full
    if mapping.layout is None or shard.axis is None or below_tp(mapping, len(shards)):
        return torch.cat(shards, dim=shard.dim)
    full_shape = list(shards[0].shape)
    full_shape[shard.dim] *= len(shards)
    sizes = infer_sizes(mapping.layout, tuple(full_shape))
    local_sizes = dict(sizes, **{shard.axis: sizes[shard.axis] // len(shards)})
    pos = axis_position(mapping.layout, shard.axis)
    views = [s.reshape(factored_shape(mapping.layout, local_sizes)) for s in shards]
    return torch.cat(views, dim=pos).reshape(full_shape)


# ---------------------------------------------------------------- programs


Reader = Callable[[str], torch.Tensor]


def run_import(mapping: ir.Mapping, parts: dict[str, torch.Tensor], read: Reader | None = None) -> torch.Tensor:
    """HF parts -> the full Megatron tensor, by the mapping's written program."""
    parts = dict(parts)
    tensor = parts["x"] if len(parts) == 1 and "x" in parts else None
    for op in mapping.hf_to_mcore:
        match op:
            case ir.FillAbsent(part=part, policy="copy_of", source_part=src):
                parts[part] = parts[src].clone()
            case ir.FillAbsent(part=part):
                parts[part] = zeros_for(mapping.layout, part, parts)
            case ir.Fuse(layout=layout):
                tensor = fuse(layout, parts)
            case _:
                tensor = _elementwise(op, tensor, read, mapping)
    if tensor is None:
        (tensor,) = parts.values()
    return tensor


def run_export(mapping: ir.Mapping, tensor: torch.Tensor, read: Reader | None = None,
               hf_dtype: torch.dtype | None = None, check_absent: bool = True) -> dict[str, torch.Tensor]:
    """A full Megatron tensor -> its HF parts, by the derived program; absent parts are checked (unless the user
    chose `check_absent=False`, i.e. to drop them unchecked), then dropped."""
    parts = None
    for op in mapping.mcore_to_hf:
        match op:
            case ir.Split(layout=layout):
                parts = split(layout, tensor)
            case ir.CheckAbsent():
                if check_absent:
                    _check_absent(op, parts, mapping)
                del parts[op.part]
            case ir.Cast(dtype="source"):
                tensor = tensor.to(hf_dtype) if hf_dtype is not None else tensor
            case _:
                tensor = _elementwise(op, tensor, read, mapping)
    if parts is None:
        parts = {mapping.sources[0].part if mapping.sources else "x": tensor}
    return parts


def _elementwise(op, tensor, read, mapping):
    match op:
        case ir.AddConst(value=value):
            return tensor + value
        case ir.Cast(dtype=dtype):
            return tensor.to(getattr(torch, dtype))
        case ir.ScaleBy(key=key, invert=invert):
            if read is None:
                raise ConversionError("scale op needs a reader for its scale tensor", key=key, rule=mapping.span)
            scale = read(key).to(tensor.dtype)
            return tensor / scale if invert else tensor * scale
    raise ConversionError(f"unsupported op {op!r}", key=mapping.mcore, rule=mapping.span)


def _check_absent(op: ir.CheckAbsent, parts: dict, mapping: ir.Mapping) -> None:
    value = parts[op.part]
    expected = parts[op.source_part] if op.policy == "copy_of" else torch.zeros_like(value)
    if torch.equal(value, expected):
        return
    diff = (value.float() - expected.float()).abs().max().item()
    what = f"a copy of part '{op.source_part}'" if op.policy == "copy_of" else "zeros"
    layer = f" in layer {mapping.layer}" if mapping.layer is not None else ""
    raise ConversionError(
        f"part '{op.part}' of '{mapping.mcore}'{layer} is ABSENT_PROJECTION on the HF side and must still be {what}, "
        f"but it diverged (max |difference| {diff:.6g}); the HF model cannot represent it. Re-tie it before "
        f"export or export with the policy 'drop' (--absent drop)", key=mapping.mcore, rule=op.span)
