"""What a generated bridge module (`specbridge compile`) imports: the template and IR types, the compiler's own
`resolve`, `invert` and `order` passes, the spec language's functions and config accessor, and the two
conversions.

A bridge module is a spec's rule templates printed as Python (see `compiler/emit.py`): it imports this module,
never the spec file, the YAML reader or the expression parser (importing this module loads neither), and it
runs exactly the passes the interpreted compiler runs, so its `plan()` equals `compile_plan` and its errors are
the same `specbridge.errors` types. Expressions in a bridge read configs, call functions and compute through the
evaluator's own accessor, function table and bounded operators (errors raised here without a place are placed
by `resolve` at the expression that raised them).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..compiler import evaluate
from ..compiler.evaluate import FUNCTIONS, call_function
from ..compiler.invert import invert
from ..compiler.ir import BRACKET, Plan, Shard, Span, expand_subtrees
from ..compiler.plan import order
from ..compiler.resolve import resolve
from ..compiler.templates import (
    EXPERT,
    LAYER,
    Absent,
    Architecture,
    ConfigTemplate,
    Key,
    LayoutTemplate,
    MappingProduct,
    OpCall,
    Part,
    Requirement,
    Rule,
    SentinelProduct,
    SubtreeProduct,
    Templates,
    Value,
)
from .ops import run_export, run_import

_NOWHERE = evaluate.UNKNOWN_SPAN  # resolve places an error raised here at the expression that raised it

__all__ = [
    "BRACKET", "EXPERT", "LAYER", "Absent", "Architecture", "ConfigTemplate", "Key", "LayoutTemplate",
    "MappingProduct", "OpCall", "Part", "Plan", "Requirement", "Rule", "SentinelProduct", "Shard", "Span",
    "SubtreeProduct", "Templates", "Value", "apply", "expand_subtrees", "field", "fn", "hf_to_mcore", "invert",
    "mcore_to_hf", "negate", "order", "resolve", "subscript",
]


def field(config, name: str):
    """Field `name` of a config (a spec's bare name or `a.b`), read as the evaluator reads it."""
    return evaluate.config_field(config, name, _NOWHERE)


def apply(op: str, left, right):
    """`left op right` by the evaluator's bounded operator."""
    return evaluate.apply(op, left, right, _NOWHERE)


def negate(value):
    return evaluate.negate(value, _NOWHERE)


def subscript(value, index):
    return evaluate.subscript(value, index, _NOWHERE)


def _function(function):
    def call(*args):
        return call_function(function, args, _NOWHERE)
    call.__name__ = function.name
    return call


fn = SimpleNamespace(**{name: _function(function) for name, function in FUNCTIONS.items()})
fn.__doc__ = "The spec language's functions (`compiler.evaluate.FUNCTIONS`), called as the interpreter calls them."


def hf_to_mcore(plan: Plan, read):
    """Yield (Megatron key, full tensor) per mapping; `read(key)` returns a whole HF tensor (stacks included)."""
    for mapping in plan.mappings:
        parts = {s.part: read(s.key) if s.index is None else read(s.key)[s.index] for s in mapping.sources}
        yield mapping.mcore, run_import(mapping, parts, read=read)


def mcore_to_hf(plan: Plan, tensors):
    """Yield (HF key, tensor) from full Megatron tensors `tensors[key]`; stacked HF tensors once complete."""
    lengths, stacks = dict(plan.stacks), {}
    for mapping in plan.mappings:
        parts = run_export(mapping, tensors[mapping.mcore], read=tensors.__getitem__)
        for source in mapping.sources:
            if source.index is None:
                yield source.key, parts[source.part]
                continue
            slices = stacks.setdefault(source.key, {})
            slices[source.index] = parts[source.part]
            if len(slices) == lengths[source.key]:
                del stacks[source.key]
                yield source.key, torch.stack([slices[k] for k in range(lengths[source.key])])
