"""The op table: every op a mapping's program can hold, declared once (its IR node and its row).

A row (`OpDef`) says how a spec writes the op and with which arguments (validate), how evaluated arguments
become the IR node (resolve, and through it the emitted bridge), whether the op is exact for the dtype it is
applied to (resolve, check, explain, the CLI's count), its inverse (invert), which tensor its inverse needs
carried to the other side (check), how tensor parallelism treats it (the importer), and how `explain` words it.
The runtime keeps one kernel per op, looked up by the row's `name` (`runtime/ops.py`, `KERNELS`).

Adding an op: its IR node and its row here, its kernel in `runtime/ops.py`. Pure data and small functions: no
torch, no parser.

Dtypes are named as torch names them (`DTYPES`); `represents(target, source)` says whether every value of
`source` is a value of `target`, which decides the exactness of a cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dsl.diagnostics import Span

if TYPE_CHECKING:
    from .layouts import Layout


# ---------------------------------------------------------------- the IR nodes (a program is a tuple of these)


@dataclass(frozen=True, slots=True)
class Fuse:
    """parts -> one tensor, by the layout. Inverse: Split."""

    layout: Layout


@dataclass(frozen=True, slots=True)
class Split:
    layout: Layout


@dataclass(frozen=True, slots=True)
class SplitSource:
    """The one HF tensor is itself fused: its parts by the HF-side `layout` (Phi-3's `qkv_proj` = [q; k; v]).
    Import splits it into the parts the Megatron layout then fuses; the inverse (`join`) fuses the parts back."""

    layout: Layout
    join: bool = False


@dataclass(frozen=True, slots=True)
class FillAbsent:
    """Import: part `part` does not exist on the HF side; fill it by `policy` ("copy_of" a sibling, or "zeros")."""

    part: str
    policy: str
    source_part: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class CheckAbsent:
    """Export: assert `part` still follows its policy, then discard it (the HF side has no such tensor)."""

    part: str
    policy: str
    source_part: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class AddConst:
    value: float


@dataclass(frozen=True, slots=True)
class Cast:
    dtype: str  # one of DTYPES; SOURCE means: back to the dtype read from the HF file


@dataclass(frozen=True, slots=True)
class ScaleBy:
    """Multiply (or divide, when `invert`) by another tensor of the same side, named by its key on that side."""

    key: str
    invert: bool = False


Op = Fuse | Split | SplitSource | FillAbsent | CheckAbsent | AddConst | Cast | ScaleBy
SOURCE = "source"


# ---------------------------------------------------------------- dtypes

# name -> (kind, exponent bits, value bits): floats (exponent, fraction), integers (0, magnitude bits)
DTYPES: dict[str, tuple[str, int, int]] = {
    "float64": ("float", 11, 52), "float32": ("float", 8, 23), "bfloat16": ("float", 8, 7),
    "float16": ("float", 5, 10), "int64": ("int", 0, 63), "int32": ("int", 0, 31), "int16": ("int", 0, 15),
    "int8": ("int", 0, 7), "uint8": ("uint", 0, 8), "bool": ("bool", 0, 1),
}
CHECKPOINT_FLOATS = ("bfloat16", "float16", "float32")  # what an HF tensor is when its dtype is not known yet


def represents(target: str, source: str) -> bool:
    """Every value of dtype `source` is a value of dtype `target` (a cast from `source` to `target` and back is
    the identity)."""
    (t_kind, t_exp, t_bits), (s_kind, s_exp, s_bits) = DTYPES[target], DTYPES[source]
    if target == source or s_kind == "bool":
        return True
    if t_kind == "float":
        if s_kind == "float":
            return t_exp >= s_exp and t_bits >= s_bits
        return s_bits <= t_bits + 1  # integers up to 2**(fraction + 1) are exact
    if t_kind == "int":
        return s_kind in ("int", "uint") and s_bits <= t_bits
    return False  # to uint8 or bool: negatives / other values are lost


# ---------------------------------------------------------------- the table


class OpArgumentError(ValueError):
    """An op argument that cannot work (raised by a row's `build`; resolve reports it at the op's span)."""


@dataclass(frozen=True, slots=True)
class Param:
    """An argument of an op written under `ops:`. kind: "number" (an expression giving a finite number),
    "dtype" (a dtype name), "pattern" (a quoted tensor pattern of the same side, captures of the rule allowed)."""

    name: str
    kind: str
    keyword: bool = False  # may be written `name=...`


@dataclass(frozen=True, slots=True)
class Inversion:
    """What inverting needs: the Megatron key of every HF tensor carried by a plain rename."""

    carried: dict[str, str]


@dataclass(frozen=True, slots=True)
class OpDef:
    name: str  # the kernel's name; for `written == "ops"` also the spec's spelling
    node: type
    written: str  # where a spec states it: "ops" (a call), "layout" (fuse), "hf_layout" (an HF-side split),
    #               "absent", "derived" (by invert)
    params: tuple[Param, ...]
    build: Callable | None  # evaluated arguments -> the IR node (rows written under `ops:`)
    inverse: Callable[[Op, Inversion], Op]
    exact: Callable[[Op, str | None], bool]  # (node, dtype it is applied to, None when not known yet)
    needs: Callable[[Op], str | None]  # the HF tensor its inverse reads on the other side (None: nothing)
    sharding: str  # "elementwise": commutes with any TP slice; "whole": needs the full tensor; "layout"
    describe: Callable[[Op], str]
    dtype_after: Callable[[Op, str | None], str | None] = lambda op, dtype: dtype  # the dtype it leaves


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OpArgumentError(f"takes a finite number, got {value!r}")
    return float(value)


def _cast_exact(op: Cast, dtype: str | None) -> bool:
    if op.dtype == SOURCE:
        return True
    sources = (dtype,) if dtype in DTYPES else CHECKPOINT_FLOATS
    return all(represents(op.dtype, s) for s in sources)


def _never(op, dtype) -> bool:
    return False


def _always(op, dtype) -> bool:
    return True


def _nothing(op) -> None:
    return None


def _scale_inverse(op: ScaleBy, inversion: Inversion) -> ScaleBy:
    return ScaleBy(inversion.carried[op.key], not op.invert)


ROWS: tuple[OpDef, ...] = (
    OpDef("fuse", Fuse, "layout", (), None, lambda op, _: Split(op.layout), _always, _nothing, "layout",
          lambda op: "fuse parts by layout"),
    OpDef("split", Split, "derived", (), None, lambda op, _: Fuse(op.layout), _always, _nothing, "layout",
          lambda op: "split into parts by layout"),
    OpDef("hf_layout", SplitSource, "hf_layout", (), None, lambda op, _: SplitSource(op.layout, not op.join),
          _always, _nothing, "layout",
          lambda op: ("join parts into the hf tensor by " if op.join else "split the hf tensor into parts by ")
                     + f"hf_layout '{op.layout.text}'"),
    OpDef("fill_absent", FillAbsent, "absent", (), None,
          lambda op, _: CheckAbsent(op.part, op.policy, op.source_part, op.span), _always, _nothing, "layout",
          lambda op: f"ABSENT_PROJECTION {op.part} := "
                     + (f"copy of {op.source_part}" if op.policy == "copy_of" else "zeros")),
    OpDef("check_absent", CheckAbsent, "derived", (), None,
          lambda op, _: FillAbsent(op.part, op.policy, op.source_part, op.span), _always, _nothing, "layout",
          lambda op: f"assert {op.part} == " + (op.source_part if op.policy == "copy_of" else "0")
                     + f", drop {op.part}"),
    OpDef("add", AddConst, "ops", (Param("value", "number"),), lambda value: AddConst(_number(value)),
          lambda op, _: AddConst(-op.value), _never, _nothing, "elementwise", lambda op: f"add {op.value:g}"),
    OpDef("cast", Cast, "ops", (Param("dtype", "dtype"),), lambda dtype: Cast(dtype),
          lambda op, _: Cast(SOURCE), _cast_exact, _nothing, "elementwise",
          lambda op: "cast back to the dtype read" if op.dtype == SOURCE else f"cast to {op.dtype}",
          lambda op, dtype: dtype if op.dtype == SOURCE else op.dtype),
    OpDef("scale", ScaleBy, "ops", (Param("by", "pattern", keyword=True),), lambda key: ScaleBy(key),
          _scale_inverse, _never, lambda op: None if op.invert else op.key, "whole",
          lambda op: f"{'divide' if op.invert else 'multiply'} by {op.key}"),
)
BY_NODE: dict[type, OpDef] = {row.node: row for row in ROWS}
SPEC_OPS: dict[str, OpDef] = {row.name: row for row in ROWS if row.written == "ops"}


def row(op: Op) -> OpDef:
    return BY_NODE[type(op)]


def exact(program, dtype: str | None = None) -> bool:
    """Whether a program is a bit-exact bijection for tensors of `dtype` (None: not known yet)."""
    for op in program:
        if not row(op).exact(op, dtype):
            return False
        dtype = row(op).dtype_after(op, dtype)
    return True


def inverse(program, inversion: Inversion) -> tuple[Op, ...]:
    """The program that undoes `program`: reversed, each op replaced by its inverse."""
    return tuple(row(op).inverse(op, inversion) for op in reversed(program))


def needs(program) -> tuple[str, ...]:
    """HF tensors the inverse of `program` reads on the Megatron side."""
    return tuple(key for op in program if (key := row(op).needs(op)) is not None)


def describe(program) -> str:
    return " ; ".join(row(op).describe(op) for op in program) or "rename"
