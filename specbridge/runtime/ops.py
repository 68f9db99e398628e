"""Tensor kernels for the IR ops, and the interpreter of a mapping's two programs.

`run_import(mapping, parts)` turns the HF tensors of one mapping into the full Megatron tensor;
`run_export(mapping, tensor)` turns a full Megatron tensor back into its HF parts (asserting absent parts still
follow their policy). Tensor-parallel slicing lives in `runtime/tp.py`. All kernels are views, `cat`s and exact
elementwise ops: round trips are bit-exact unless an op is declared inexact (`Mapping.exact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..compiler import ir
from ..compiler.layouts import bracket_position, factored_shape, infer_sizes, shape_of
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
