"""Pass `lower`: a validated `ast.Spec` -> `templates.Templates`, the one lowering of a spec.

Both the interpreter (`resolve`: templates x config -> plan) and `specbridge compile` (`emit`: templates ->
Python source) start from its result, so a DSL feature is lowered in one place. Decided here, once per spec:
name templates, capture domains in layer order, shards, layout dims, absent policies, op rows and their
arguments, which config entries can be written back (`hf_path`), the names each expression reads.
"""

from __future__ import annotations

import functools

from ..dsl import ast
from ..dsl.printer import to_text
from . import ir, ops
from .templates import (
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
    digest,
)
from .validate import captures_of, op_arguments


@functools.lru_cache(maxsize=32)
def lower(spec: ast.Spec) -> Templates:
    symbols = {s.name for s in spec.symbols}
    config = tuple(ConfigTemplate(section, f.field, _value(f.expr, ()), hf_path(f.expr, symbols), f.span)
                   for section, fields in (("transformer", spec.transformer), ("model_args", spec.model_args))
                   for f in fields)
    return Templates(
        spec.name, spec.file, digest(spec.merged_source), spec.model,
        tuple(Architecture(a.name, a.prefix, a.config) for a in spec.architectures), tuple(spec.formats),
        tuple(Requirement(_value(r, ()), to_text(r)) for r in spec.requires), config,
        tuple(_rule(rule) for rule in spec.rules), tuple(spec.symbols), spec.span)


def hf_path(expr, symbols) -> str | None:
    """`hidden_size` or `rope_parameters.rope_theta` name an HF field directly: they can be written back."""
    if isinstance(expr, ast.Name) and expr.id not in symbols:
        return expr.id
    if isinstance(expr, ast.Attribute):
        inner = hf_path(expr.value, symbols)
        return f"{inner}.{expr.attr}" if inner else None
    return None


def key(pattern: ast.Pattern) -> Key:
    """The pattern as a `str.format` template: literals escaped, `{prefix}` and captures as fields."""
    def piece(p) -> str:
        if isinstance(p, ast.Literal):
            return p.text.replace("{", "{{").replace("}", "}}")
        return "{" + p.name + "}"
    text = ".".join("".join(piece(p) for p in segment) for segment in pattern.segments)
    return Key(text + ("." if pattern.subtree else ""))


def _rule(rule: ast.Rule) -> Rule:
    kinds = captures_of(rule)
    order = {LAYER: 0, EXPERT: 1}
    names = sorted(kinds, key=lambda n: (order.get(kinds[n][0], 2) if len(kinds[n]) == 1 else 2, n))
    captures = tuple((n, kinds[n][0] if kinds[n] in ((LAYER,), (EXPERT,)) else kinds[n]) for n in names)
    visible = tuple(names)
    when = _value(rule.when, visible) if rule.when is not None else None
    return Rule(rule.index, rule.span, captures, _product(rule, visible), when, rule.format)


def _product(rule: ast.Rule, visible: tuple[str, ...]):
    if rule.mcore is not None and rule.mcore.subtree:
        return SubtreeProduct(key(rule.hf[0][1]), key(rule.mcore))
    if rule.sentinel is not None:
        side, pattern = (ir.MCORE, rule.mcore) if rule.mcore is not None else (ir.HF, rule.hf[0][1])
        call = rule.sentinel
        return SentinelProduct(side, key(pattern), call.name, str(call.args[0].value), call.span)
    layout = _layout(rule.layout, visible) if rule.layout is not None else None
    sources = tuple(Part(part, key(p), p.stack_index.name if p.stack_index else None) for part, p in rule.hf)
    hf_layout = _layout(rule.hf_layout, visible) if rule.hf_layout is not None else None
    return MappingProduct(key(rule.mcore), sources, shard(rule.shard, layout), layout,
                          tuple(_absent(part, call, visible) for part, call in rule.absent),
                          tuple(_op(call, visible) for call in rule.ops), hf_layout)


def _layout(layout: ast.Layout, visible: tuple[str, ...]) -> LayoutTemplate:
    bindings, seen = [], list(visible)
    for name, expr in layout.bindings:
        bindings.append((name, _value(expr, tuple(seen))))
        seen.append(name)
    dims, parts = [], []
    for dim in layout.dims:
        factors = []
        for factor in dim:
            if isinstance(factor, ast.Parts):
                factors.append(ir.BRACKET)
                parts += [(p.name, None if p.size is None else _value(p.size, tuple(seen), p.span))
                          for p in factor.parts]
            else:
                factors.append(factor.name)
        dims.append(tuple(factors))
    return LayoutTemplate(tuple(dims), tuple(bindings), tuple(parts), layout.text.split(" with ")[0].strip())


def shard(kind: str, layout: LayoutTemplate | None) -> ir.Shard:
    if kind == "replicated":
        return ir.Shard("replicated")
    if kind == "vocab":
        return ir.Shard("vocab", dim=0)
    if kind in ("column", "row"):
        dim = 0 if kind == "column" else 1
        return ir.Shard("axis", axis=layout.dims[dim][0] if layout is not None else None, dim=dim)
    dim = next(k for k, d in enumerate(layout.dims) if kind in d)
    return ir.Shard("axis", axis=kind, dim=dim)


def _absent(part: str, call: ast.Call, visible) -> Absent:
    copy_of = call.kwarg("copy_of")
    when = _value(call.when, visible) if call.when is not None else None
    if copy_of is not None:
        return Absent(part, "copy_of", copy_of.id, when, call.span)
    return Absent(part, "zeros", None, when, call.span)


def _op(call: ast.Call, visible) -> OpCall:
    row = ops.SPEC_OPS[call.name]
    args, _ = op_arguments(call, row)
    lowered = tuple(_value(a, visible) if p.kind == "number" else key(a) if p.kind == "pattern" else a
                    for p, a in zip(row.params, args))
    return OpCall(row.name, lowered, _value(call.when, visible) if call.when is not None else None, call.span)


def _value(expr, visible: tuple[str, ...], span=None) -> Value:
    """`expr` with the names it reads among `visible` (captures and layout sizes); `span` locates its errors
    (the expression's own by default)."""
    return Value(expr, span or expr.span, tuple(sorted(free_names(expr) & set(visible))))


def free_names(node) -> frozenset[str]:
    """Every `Name` an expression mentions (symbol bodies excluded: they never see rule captures)."""
    match node:
        case None | ast.Const() | str():
            return frozenset()
        case ast.Name(id=name):
            return frozenset((name,))
        case tuple() | list():
            return frozenset().union(*(free_names(item) for item in node))
        case ast.ListExpr(items=items):
            return free_names(items)
        case ast.BinOp(left=left, right=right):
            return free_names((left, right))
        case ast.UnaryOp(operand=operand):
            return free_names(operand)
        case ast.IfElse(cond=cond, then=then, other=other):
            return free_names((cond, then, other))
        case ast.CallExpr(func=func, args=args):
            return free_names((func, args))
        case ast.Subscript(value=value, index=index):
            return free_names((value, index))
        case ast.Attribute(value=value):
            return free_names(value)
    raise TypeError(f"not an expression: {type(node).__name__}")
