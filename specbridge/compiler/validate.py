"""Pass `validate` (the config-independent half of `check`): meaning errors that need no HF config.

In: an `ast.Spec`. Out: the same spec, or a `SpecError` with every problem found: capture kinds and arity
(each capture bound once with a kind, used on both sides), unknown references, sentinel and op names and
arguments, absent parts and their policies, layouts against the rule's parts, shard axes, formats, and
rules that would claim the same tensor.
"""

from __future__ import annotations

from ..dsl import ast
from ..dsl.diagnostics import DiagnosticSink

SENTINELS = {"tied": 1, "derived": 1, "ignored": 1}
OPS = {"add": 1, "cast": 1, "scale": 1}
ABSENT = "ABSENT_PROJECTION"
CAPTURE_KINDS = ("layer", "expert")
PARAMETERS = ("prefix",)
SHARD_KINDS = ("replicated", "column", "row", "vocab")


def captures_of(rule: ast.Rule) -> dict[str, tuple[str, ...]]:
    """Capture name -> kind, over every pattern of the rule."""
    kinds: dict[str, tuple[str, ...]] = {}
    for pattern in _patterns(rule):
        for piece in pattern.pieces():
            if isinstance(piece, ast.Capture):
                kinds.setdefault(piece.name, piece.kind)
    return kinds


def _patterns(rule: ast.Rule):
    if rule.mcore is not None:
        yield rule.mcore
    for _, pattern in rule.hf:
        yield pattern


def _used(pattern: ast.Pattern) -> set[str]:
    return {p.name for p in pattern.pieces() if isinstance(p, ast.Ref | ast.Capture) and p.name not in PARAMETERS}


def validate(spec: ast.Spec) -> ast.Spec:
    sink = DiagnosticSink(spec.texts)
    _check_symbols(spec, sink)
    for rule in spec.rules:
        _check_captures(rule, sink)
        if rule.sentinel is not None:
            _check_sentinel(rule, sink)
        else:
            _check_mapping(rule, spec, sink)
    _check_duplicates(spec, sink)
    sink.raise_if_any()
    return spec


def _check_symbols(spec: ast.Spec, sink: DiagnosticSink) -> None:
    seen = set()
    for symbol in spec.symbols:
        if symbol.name in seen:
            sink.error(symbol.span, f"symbol '{symbol.name}' is defined twice")
        seen.add(symbol.name)
    names = [a.name for a in spec.architectures]
    if not names:
        sink.error(spec.span, "hf.architectures names no architecture")


def _check_captures(rule: ast.Rule, sink: DiagnosticSink) -> None:
    kinds: dict[str, tuple[str, ...]] = {}
    for pattern in _patterns(rule):
        for piece in pattern.pieces():
            if isinstance(piece, ast.Capture):
                if piece.name in PARAMETERS:
                    sink.error(piece.span, f"'{piece.name}' is a spec parameter and cannot be captured")
                elif piece.name in kinds and kinds[piece.name] != piece.kind:
                    sink.error(piece.span, f"capture '{piece.name}' is bound twice with different kinds")
                elif len(piece.kind) == 1 and piece.kind[0] not in CAPTURE_KINDS:
                    sink.error(piece.span, f"capture '{piece.name}' has unknown kind '{piece.kind[0]}' "
                                           f"(expected layer, expert, or an enum such as a|b)")
                kinds.setdefault(piece.name, piece.kind)
    for pattern in _patterns(rule):
        for piece in pattern.pieces():
            if isinstance(piece, ast.Ref) and piece.name not in PARAMETERS and piece.name not in kinds:
                sink.error(piece.span, f"capture '{piece.name}' has no kind: bind it once as "
                                       f"{{{piece.name}:layer}}, {{{piece.name}:expert}} or an enum")
    if rule.mcore is None or not rule.hf:
        return
    want = _used(rule.mcore)
    for part, pattern in rule.hf:
        got = _used(pattern)
        for name in sorted(got - want):
            sink.error(_piece_span(pattern, name), f"capture '{name}' is bound on the hf side but unused on the "
                                                   f"mcore side")
        for name in sorted(want - got):
            sink.error(_piece_span(rule.mcore, name), f"capture '{name}' is bound on the mcore side but unused in "
                                                      f"the hf pattern of part '{part}'")


def _piece_span(pattern: ast.Pattern, name: str):
    return next((p.span for p in pattern.pieces() if getattr(p, "name", None) == name), pattern.span)


def _check_sentinel(rule: ast.Rule, sink: DiagnosticSink) -> None:
    call = rule.sentinel
    if call.name not in SENTINELS:
        hint = " (ABSENT_PROJECTION belongs under 'absent:')" if call.name == ABSENT else ""
        sink.error(call.span, f"unknown sentinel '{call.name}' (expected tied, derived or ignored){hint}")
    elif len(call.args) != 1 or not isinstance(call.args[0], ast.Const) or not str(call.args[0].value).strip():
        sink.error(call.span, f"sentinel '{call.name}' needs one non-empty string argument "
                              f"({'the tied tensor' if call.name == 'tied' else 'the reason'})")
    if (rule.mcore is None) == (not rule.hf):
        sink.error(rule.span, "a sentinel rule names exactly one side: 'hf' or 'mcore', not both")
    if len(rule.hf) > 1:
        sink.error(rule.span, "a sentinel rule names a single hf pattern")
    for key, present in (("layout", rule.layout), ("absent", rule.absent), ("ops", rule.ops)):
        if present:
            sink.error(rule.span, f"a sentinel rule cannot have '{key}'")


def _check_mapping(rule: ast.Rule, spec: ast.Spec, sink: DiagnosticSink) -> None:
    if rule.mcore is None or not rule.hf:
        sink.error(rule.span, "a mapping rule needs both 'mcore' and 'hf' (or a 'sentinel')")
        return
    if rule.mcore.stack_index is not None:
        sink.error(rule.mcore.stack_index.span, "a stack index [{...}] is only allowed on the hf side")
    parts = [p for p, _ in rule.hf]
    if len(parts) > 1 and rule.layout is None:
        sink.error(rule.span, f"rule fuses parts {parts} but has no 'layout' saying how")
    if rule.layout is not None:
        _check_layout(rule, parts, sink)
    _check_absent(rule, parts, sink)
    _check_ops(rule, sink)
    _check_shard(rule, sink)
    if rule.format is not None and rule.format not in spec.formats:
        sink.error(rule.span, f"format '{rule.format}' is not one of hf.formats ({', '.join(spec.formats)})")


def _check_layout(rule: ast.Rule, parts: list[str], sink: DiagnosticSink) -> None:
    layout = rule.layout
    brackets = [f for dim in layout.dims for f in dim if isinstance(f, ast.Parts)]
    if len(brackets) > 1:
        sink.error(brackets[1].span, "a layout has at most one [parts] bracket")
    named = [p.name for b in brackets for p in b.parts]
    if brackets and sorted(named) != sorted(parts):
        sink.error(brackets[0].span, f"layout parts {named} do not match the rule's hf parts {parts}")
    if not brackets and len(parts) > 1:
        sink.error(layout.span, f"layout has no [parts] bracket for the parts {parts}")
    axes = [f.name for dim in layout.dims for f in dim if isinstance(f, ast.Axis)]
    for axis in {a for a in axes if axes.count(a) > 1}:
        sink.error(layout.span, f"axis '{axis}' appears twice in the layout")
    used = {n for b in brackets for p in b.parts if p.size is not None for n in _names(p.size)}
    for name, expr in layout.bindings:
        if name not in axes and name not in used:
            sink.error(expr.span, f"binding '{name}' names no axis of the layout (axes: {', '.join(axes)}) and no "
                                  f"size used by its parts")


def _names(expr) -> set[str]:
    """Every bare name inside an expression."""
    if isinstance(expr, ast.Name):
        return {expr.id}
    children = [getattr(expr, f) for f in getattr(expr, "__slots__", ()) if f != "span"]
    flat = [c for child in children for c in (child if isinstance(child, tuple) else (child,))]
    return set().union(*(_names(c) for c in flat if hasattr(c, "span")))


def _check_absent(rule: ast.Rule, parts: list[str], sink: DiagnosticSink) -> None:
    absent = {p for p, _ in rule.absent}
    for part, call in rule.absent:
        if part not in parts:
            sink.error(call.span, f"absent part '{part}' is not one of the rule's hf parts {parts}")
        if call.name != ABSENT:
            sink.error(call.span, f"an absent part must be stated as {ABSENT}(...), not '{call.name}'")
            continue
        copy_of = call.kwarg("copy_of")
        zeros = [a for a in call.args if isinstance(a, ast.Name) and a.id == "zeros"]
        if (copy_of is None) == (not zeros) or len(call.args) + len(call.kwargs) != 1:
            sink.error(call.span, f"{ABSENT} takes one policy: copy_of=<part> or zeros")
        elif copy_of is not None and (not isinstance(copy_of, ast.Name) or copy_of.id not in parts
                                      or copy_of.id in absent):
            sink.error(copy_of.span, f"copy_of must name a present part of this rule (parts: {parts})")


def _check_ops(rule: ast.Rule, sink: DiagnosticSink) -> None:
    for call in rule.ops:
        if call.name not in OPS:
            sink.error(call.span, f"unknown op '{call.name}' (expected add, cast or scale)")
        elif len(call.args) + len(call.kwargs) != OPS[call.name]:
            sink.error(call.span, f"op '{call.name}' takes exactly one argument")
        elif call.kwargs and (call.name, call.kwargs[0][0]) != ("scale", "by"):
            sink.error(call.span, f"op '{call.name}' takes a positional argument"
                                  f"{' or by=<pattern>' if call.name == 'scale' else ''}, not "
                                  f"'{call.kwargs[0][0]}='")
        elif call.name == "cast" and not isinstance(call.args[0], ast.Name | ast.Const):
            sink.error(call.span, "cast takes a dtype name, e.g. cast(float32)")


def _check_shard(rule: ast.Rule, sink: DiagnosticSink) -> None:
    if rule.shard in SHARD_KINDS:
        return
    axes = [] if rule.layout is None else [f.name for d in rule.layout.dims for f in d if isinstance(f, ast.Axis)]
    if rule.shard not in axes:
        sink.error(rule.shard_span, f"shard '{rule.shard}' is neither one of {', '.join(SHARD_KINDS)} nor an axis "
                                    f"of the layout")


def _check_duplicates(spec: ast.Spec, sink: DiagnosticSink) -> None:
    """Two unconditional rules with the same pattern (captures renamed) for the same format are ambiguous."""
    seen: dict[tuple, ast.Rule] = {}
    for rule in spec.rules:
        if rule.when is not None:
            continue
        sides = ([("mcore", rule.mcore)] if rule.mcore is not None else []) + [("hf", p) for _, p in rule.hf]
        for side, pattern in sides:
            key = (side, rule.format, _shape_of(pattern))
            if key in seen and seen[key].index != rule.index:
                sink.error(pattern.span, f"pattern '{pattern.text}' is also claimed by the rule at "
                                         f"{seen[key].span}: two rules match one name")
            seen.setdefault(key, rule)


def _shape_of(pattern: ast.Pattern) -> tuple:
    return tuple(tuple(p.text if isinstance(p, ast.Literal) else ("{}" if p.name not in PARAMETERS else p.name)
                       for p in seg) for seg in pattern.segments)
