"""Tensor kernels for the IR ops, and the interpreter of a mapping's two programs.

`run_import(mapping, parts)` turns the HF tensors of one mapping into the full Megatron tensor;
`run_export(mapping, tensor)` turns a full Megatron tensor back into its HF parts (asserting absent parts still
follow their policy). Each op of the op table (`compiler/ops.py`) has one kernel here, `KERNELS[name]`.
Tensor-parallel slicing lives in `runtime/tp.py`. All kernels are views, `cat`s and exact elementwise ops: round
trips are bit-exact unless an op is declared inexact (`Mapping.exact`); `cast` is the one dtype conversion and
keeps NaN payloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compiler import ir
from ..compiler.ops import SOURCE
from ..compiler.ops import row as op_row
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


# ---------------------------------------------------------------- programs: one kernel per op of the op table


Reader = Callable[[str], torch.Tensor]


@dataclass
class _Run:
    """What a program works on: the parts (by name) and/or the one tensor, and what its kernels may need."""

    mapping: ir.Mapping
    parts: dict[str, torch.Tensor] | None
    tensor: torch.Tensor | None
    read: Reader | None = None
    hf_dtype: torch.dtype | None = None
    check_absent: bool = True


def _fuse(op: ir.Fuse, run: _Run) -> None:
    run.tensor = fuse(op.layout, run.parts)


def _split(op: ir.Split, run: _Run) -> None:
    run.parts = split(op.layout, run.tensor)


def _split_source(op: ir.SplitSource, run: _Run) -> None:
    if op.join:
        run.tensor, run.parts = fuse(op.layout, run.parts), None
    else:
        run.parts, run.tensor = split(op.layout, run.tensor), None


def _fill_absent(op: ir.FillAbsent, run: _Run) -> None:
    if op.policy == "copy_of":
        run.parts[op.part] = run.parts[op.source_part].clone()
    else:
        run.parts[op.part] = zeros_for(run.mapping.layout, op.part, run.parts)


def _check_absent_kernel(op: ir.CheckAbsent, run: _Run) -> None:
    if run.check_absent:
        _check_absent(op, run.parts, run.mapping)
    del run.parts[op.part]


def _add(op: ir.AddConst, run: _Run) -> None:
    run.tensor = run.tensor + op.value


def _cast(op: ir.Cast, run: _Run) -> None:
    if op.dtype == SOURCE:
        run.tensor = cast(run.tensor, run.hf_dtype) if run.hf_dtype is not None else run.tensor
    else:
        run.tensor = cast(run.tensor, getattr(torch, op.dtype))


def _scale(op: ir.ScaleBy, run: _Run) -> None:
    if run.read is None:
        raise ConversionError("scale op needs a reader for its scale tensor", key=op.key, rule=run.mapping.span)
    scale = run.read(op.key).to(run.tensor.dtype)
    run.tensor = run.tensor / scale if op.invert else run.tensor * scale


KERNELS: dict[str, Callable] = {  # op name (compiler/ops.py) -> kernel(op, run)
    "fuse": _fuse, "split": _split, "hf_layout": _split_source, "fill_absent": _fill_absent, "check_absent": _check_absent_kernel,
    "add": _add, "cast": _cast, "scale": _scale,
}


def _run(program, run: _Run) -> _Run:
    for op in program:
        KERNELS[op_row(op).name](op, run)
    return run


def run_import(mapping: ir.Mapping, parts: dict[str, torch.Tensor], read: Reader | None = None) -> torch.Tensor:
    """HF parts -> the full Megatron tensor, by the mapping's written program."""
    parts = dict(parts)
    only = next(iter(parts.values())) if len(parts) == 1 else None
    run = _run(mapping.hf_to_mcore, _Run(mapping, parts, only, read))
    return run.tensor if run.tensor is not None else next(iter(run.parts.values()))


def run_export(mapping: ir.Mapping, tensor: torch.Tensor, read: Reader | None = None,
               hf_dtype: torch.dtype | None = None, check_absent: bool = True) -> dict[str, torch.Tensor]:
    """A full Megatron tensor -> its HF parts, by the derived program; absent parts are checked (unless the user
    chose `check_absent=False`, i.e. to drop them unchecked), then dropped."""
    run = _run(mapping.mcore_to_hf, _Run(mapping, None, tensor, read, hf_dtype, check_absent))
    if run.parts is None:
        return {mapping.sources[0].part if mapping.sources else "x": run.tensor}
    return run.parts


# ---------------------------------------------------------------- dtype conversion that keeps NaN payloads

_FLOAT_BITS = {  # dtype -> (same-width integer dtype, total bits, fraction bits)
    torch.float64: (torch.int64, 64, 52), torch.float32: (torch.int32, 32, 23),
    torch.float16: (torch.int16, 16, 10), torch.bfloat16: (torch.int16, 16, 7),
}


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, except that a NaN keeps its sign and payload bits (as many as fit, the quiet bit
    when none do). torch's conversions canonicalise NaNs (fp32 -> bf16 writes 0xFFFF or 0x7FC0, fp16 -> fp32
    quiets a signalling NaN), so a checkpoint's NaN would not survive a round trip through a wider model dtype;
    with this conversion narrow -> wide -> narrow is the identity on every bit pattern."""
    out = tensor.to(dtype)
    if tensor.dtype == dtype or tensor.dtype not in _FLOAT_BITS or dtype not in _FLOAT_BITS:
        return out
    nan = torch.isnan(tensor)
    if not bool(nan.any()):
        return out
    (src_int, _, src_fraction), (dst_int, dst_bits, dst_fraction) = _FLOAT_BITS[tensor.dtype], _FLOAT_BITS[dtype]
    raw = tensor[nan].view(src_int).to(torch.int64)
    fraction = raw & ((1 << src_fraction) - 1)
    shift = dst_fraction - src_fraction
    fraction = fraction << shift if shift >= 0 else fraction >> -shift
    fraction = torch.where(fraction == 0, 1 << (dst_fraction - 1), fraction)
    exponent = ((1 << (dst_bits - dst_fraction - 1)) - 1) << dst_fraction
    bits = torch.where(raw < 0, (exponent | fraction) + (-(1 << (dst_bits - 1))), exponent | fraction)
    out = out.contiguous()
    out.view(dst_int)[nan] = bits.to(dst_int)
    return out


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
