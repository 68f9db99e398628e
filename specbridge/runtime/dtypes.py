"""Tensor dtypes of checkpoints: the one table of safetensors dtype names, and the rule that no value changes
silently.

Import keeps the checkpoint's dtype (a bf16 checkpoint gives bf16 parameters). An HF tensor is converted into a
parameter of another dtype only when the cast is exact (every value of its dtype is one of the target's: bf16 ->
fp32, int8 -> bf16, ...), when the spec's rule casts it itself (`cast(...)`), or when the user asked for it
(`--dtype`, `cast=True`); `import_casts` lists every such cast so that it is reported.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import torch

from ..compiler import ir
from ..errors import ConversionError, UsageError

SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
               "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
               "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in SAFETENSORS.items()}
CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # parameter dtypes

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# source dtype -> the dtypes that hold every one of its values
_EXACT_INTO = {
    torch.float32: {torch.float64},
    torch.bfloat16: {torch.float32, torch.float64},
    torch.float16: {torch.float32, torch.float64},
    torch.float8_e4m3fn: set(_FLOATS),
    torch.float8_e5m2: set(_FLOATS),
    torch.bool: set(_FLOATS),
    torch.int8: set(_FLOATS),
    torch.uint8: set(_FLOATS),
    torch.int16: {torch.float32, torch.float64},
    torch.int32: {torch.float64},
}


def short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_choice(name: str | None) -> torch.dtype | None:
    """A `--dtype` value; None when not given."""
    if name is None:
        return None
    if name not in CHOICES:
        raise UsageError(f"--dtype must be one of {', '.join(CHOICES)}, not '{name}'")
    return CHOICES[name]


def exact(source: torch.dtype, target: torch.dtype) -> bool:
    return source == target or target in _EXACT_INTO.get(source, ())


@dataclasses.dataclass(frozen=True, slots=True)
class Cast:
    key: str
    source: torch.dtype
    target: torch.dtype

    @property
    def exact(self) -> bool:
        return exact(self.source, self.target)

    def __str__(self) -> str:
        return f"{self.key} ({short(self.source)} -> {short(self.target)})"


def dominant(counts: Iterable[tuple[torch.dtype, int]]) -> torch.dtype | None:
    """The floating-point dtype holding most numbers among (dtype, numel) pairs (megatron-core keeps some norms in
    fp32 whatever the parameters' dtype); None when there are none."""
    totals: collections.Counter[torch.dtype] = collections.Counter()
    for dtype, numel in counts:
        if dtype.is_floating_point:
            totals[dtype] += numel
    return max(totals, key=totals.get) if totals else None


def census(reader) -> dict[torch.dtype, list[str]]:
    """The checkpoint's tensors by dtype (keys sorted). A tensor whose header cannot be read is left out: the
    import reads it and reports it there, with the rule and rank that needed it."""
    out: dict[torch.dtype, list[str]] = {}
    for key in sorted(reader.keys()):
        try:
            dtype = reader.entry(key)[1].dtype
        except ConversionError:
            continue
        out.setdefault(dtype, []).append(key)
    return out


def uniform(reader) -> torch.dtype | None:
    """The one dtype of every tensor of the checkpoint; None when they differ."""
    dtypes = census(reader)
    return next(iter(dtypes)) if len(dtypes) == 1 else None


def checkpoint_dtype(reader) -> torch.dtype:
    """The one dtype of every tensor; an error naming a tensor of another dtype when they differ."""
    dtypes = census(reader)
    if len(dtypes) <= 1:
        return next(iter(dtypes), torch.float32)
    common = max(dtypes, key=lambda d: len(dtypes[d]))
    odd = min((keys[0] for d, keys in dtypes.items() if d != common))
    odd_dtype = next(d for d, keys in dtypes.items() if odd in keys)
    raise ConversionError(f"tensor '{odd}' is {NAMES[odd_dtype]} while the checkpoint's other tensors are "
                          f"{' / '.join(NAMES[d] for d in dtypes if d != odd_dtype)}: pass --dtype "
                          f"({', '.join(CHOICES)}) to convert every tensor to one dtype (each cast is reported)",
                          key=odd)


def import_casts(plan: ir.Plan, reader, params_dtype: torch.dtype) -> tuple[Cast, ...]:
    """Every HF tensor the plan reads whose dtype differs from the parameters' (rules that cast themselves
    excepted), in plan order."""
    out, seen = [], set()
    for mapping in plan.mappings:
        if any(isinstance(op, ir.Cast) for op in mapping.hf_to_mcore):
            continue
        for source in mapping.sources:
            if source.key in seen or source.key not in reader.keys():
                continue
            seen.add(source.key)
            try:
                dtype = reader.entry(source.key)[1].dtype
            except ConversionError:
                continue  # unreadable: reported by the import, located
            if dtype != params_dtype:
                out.append(Cast(source.key, dtype, params_dtype))
    return tuple(out)


def refuse_inexact(casts: tuple[Cast, ...]) -> None:
    lossy = [c for c in casts if not c.exact]
    if lossy:
        more = f" and {len(lossy) - 1} more" if len(lossy) > 1 else ""
        raise ConversionError(f"importing would change values: {lossy[0]}{more}; choose the parameters' dtype "
                              f"explicitly (--dtype, or build_model(params_dtype=...) with cast=True)",
                              key=lossy[0].key)


def summary(casts: tuple[Cast, ...], limit: int = 5) -> str:
    """One line: how many tensors were cast, from and to which dtypes, the first few named."""
    kinds = sorted({(short(c.source), short(c.target)) for c in casts})
    names = ", ".join(c.key for c in casts[:limit]) + (f", ... ({len(casts) - limit} more)" if len(casts) > limit
                                                        else "")
    return (f"cast {len(casts)} tensor(s) " + "; ".join(f"{a} -> {b}" for a, b in kinds) + f": {names}")
