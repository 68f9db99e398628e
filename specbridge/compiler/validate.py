"""Pass `validate` (the config-independent half of `check`): meaning errors that need no HF config.

In: an `ast.Spec`. Out: the same spec, or a `SpecError` with every problem found: capture kinds and arity
(each capture bound once with a kind, used on both sides), unknown references, expressions wrong by their form
(`evaluate.static_problems`: underscore names, calls of anything but a function or symbol, recursive symbols),
sentinel and op names and arguments (the op table), absent parts and their policies, layouts against the rule's
parts, shard axes, formats, subtree rules (`.**` on both sides, no captures, nothing but the two patterns), and
rules that would claim the same tensor.
"""

from __future__ import annotations

from ..dsl import ast
from ..dsl.diagnostics import DiagnosticSink
from ..dsl.expressions import parse as parse_text
from ..dsl.yaml_source import Located
from . import ops
from .evaluate import static_problems

SENTINELS = {"tied": 1, "derived": 1, "ignored": 1}
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
    for span, message in static_problems(spec):  # underscore names, calls of non-functions, recursive symbols
        sink.error(span, message)
    for rule in spec.rules:
        _check_captures(rule, sink)
        if any(p.subtree for p in _patterns(rule)):
            _check_subtree(rule, sink)
        elif rule.sentinel is not None:
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
    for key, present in (("layout", rule.layout), ("hf_layout", rule.hf_layout), ("absent", rule.absent),
                         ("ops", rule.ops)):
        if present:
            sink.error(rule.span, f"a sentinel rule cannot have '{key}'")


def _check_subtree(rule: ast.Rule, sink: DiagnosticSink) -> None:
    """`{hf: "a.**", mcore: "b.**"}` maps every tensor below `a.` to the same tail below `b.`, as it is."""
    if rule.sentinel is not None or rule.mcore is None or len(rule.hf) != 1:
        sink.error(rule.span, "a subtree rule ('.**') maps one hf pattern to one mcore pattern, both ending in '.**'")
    for pattern in _patterns(rule):
        if not pattern.subtree:
            sink.error(pattern.span, "this pattern must end in '.**' too: a subtree maps to a subtree")
        for piece in pattern.pieces():
            if isinstance(piece, ast.Ref | ast.Capture) and piece.name not in PARAMETERS:
                sink.error(piece.span, f"a subtree pattern cannot capture ('{piece.name}'): every name below the "
                                       f"prefix maps 1:1 as it is")
    for key, present in (("layout", rule.layout), ("hf_layout", rule.hf_layout), ("absent", rule.absent),
                         ("ops", rule.ops)):
        if present:
            sink.error(rule.span, f"a subtree rule cannot have '{key}': its tensors map 1:1, unchanged")
    if rule.shard != "replicated":
        sink.error(rule.shard_span, "a subtree rule is replicated: its tensors are not split by tensor parallelism")


def _check_mapping(rule: ast.Rule, spec: ast.Spec, sink: DiagnosticSink) -> None:
    if rule.mcore is None or not rule.hf:
        sink.error(rule.span, "a mapping rule needs both 'mcore' and 'hf' (or a 'sentinel')")
        return
    if rule.mcore.stack_index is not None:
        sink.error(rule.mcore.stack_index.span, "a stack index [{...}] is only allowed on the hf side")
    parts = [p for p, _ in rule.hf]
    if rule.hf_layout is not None:
        parts = _check_hf_layout(rule, sink)
    if len(parts) > 1 and rule.layout is None:
        sink.error(rule.span, f"rule fuses parts {parts} but has no 'layout' saying how")
    if rule.layout is not None:
        _check_layout(rule.layout, parts, sink)
    _check_absent(rule, parts, sink)
    _check_ops(rule, sink)
    _check_shard(rule, sink)
    if rule.format is not None and rule.format not in spec.formats:
        sink.error(rule.span, f"format '{rule.format}' is not one of hf.formats ({', '.join(spec.formats)})")


def _check_hf_layout(rule: ast.Rule, sink: DiagnosticSink) -> list[str]:
    """An HF-side layout splits the rule's one HF tensor into the parts its bracket names (which the Megatron
    layout then fuses); returns those parts."""
    layout = rule.hf_layout
    if len(rule.hf) != 1:
        sink.error(layout.span, "an hf_layout splits one hf tensor: the rule must name a single hf pattern")
    if rule.absent:
        sink.error(layout.span, "a rule with an hf_layout cannot have absent parts: they all come from one tensor")
    named = [p.name for dim in layout.dims for f in dim if isinstance(f, ast.Parts) for p in f.parts]
    if not named:
        sink.error(layout.span, "an hf_layout needs a [parts] bracket naming the parts of the hf tensor")
    _check_layout(layout, named, sink)
    return named


def _check_layout(layout: ast.Layout, parts: list[str], sink: DiagnosticSink) -> None:
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
    captures = set(captures_of(rule)) | set(PARAMETERS)
    for call in rule.ops:
        row = ops.SPEC_OPS.get(call.name)
        if row is None:
            sink.error(call.span, f"unknown op '{call.name}' (expected {_listed(ops.SPEC_OPS)})")
            continue
        args, problems = op_arguments(call, row)
        for span, message in problems:
            sink.error(span, message)
        for param, arg in zip(row.params, args):
            if param.kind != "pattern":
                continue
            for piece in arg.pieces():
                if not isinstance(piece, ast.Literal) and piece.name not in captures:
                    sink.error(piece.span, f"'{piece.name}' in {row.name}({param.name}=...) is not a capture of "
                                           f"this rule")


def op_arguments(call: ast.Call, row: ops.OpDef) -> tuple[tuple, list]:
    """The call's arguments in the row's parameter order, decoded by kind (an expression for "number", a dtype
    name, a parsed `ast.Pattern`), and the (span, message) of what is wrong with them."""
    count = {1: "one argument", 2: "two arguments"}.get(len(row.params), f"{len(row.params)} arguments")
    if len(call.args) + len(call.kwargs) != len(row.params):
        return (), [(call.span, f"op '{row.name}' takes exactly {count}: {_usage(row)}")]
    for name, _ in call.kwargs:
        if not any(p.name == name and p.keyword for p in row.params):
            keywords = "".join(f" or {p.name}=<{p.kind}>" for p in row.params if p.keyword)
            return (), [(call.span, f"op '{row.name}' takes a positional argument{keywords}, not '{name}='")]
    positional, args, problems = list(call.args), [], []
    for param in row.params:
        expr = call.kwarg(param.name) if param.keyword else None
        expr = expr if expr is not None else positional.pop(0)
        decoded, problem = _ARGUMENT_KINDS[param.kind](expr)
        if problem is not None:
            problems.append((call.span, f"{row.name} takes {problem}"))
        args.append(decoded)
    return (tuple(args), []) if not problems else ((), problems)


def _usage(row: ops.OpDef) -> str:
    return f"{row.name}({', '.join(f'<{p.kind}>' for p in row.params)})"


def _number_argument(expr):
    if isinstance(expr, ast.Const) and (isinstance(expr.value, bool) or not isinstance(expr.value, int | float)):
        return None, f"a number, got {expr.value!r}"
    return expr, None


def _dtype_argument(expr):
    name = expr.id if isinstance(expr, ast.Name) else expr.value if isinstance(expr, ast.Const) else None
    if not isinstance(name, str) or name not in ops.DTYPES:
        shown = repr(name) if isinstance(name, str) else "an expression"
        return None, f"a dtype name ({', '.join(ops.DTYPES)}), got {shown}"
    return name, None


def _pattern_argument(expr):
    if not isinstance(expr, ast.Const) or not isinstance(expr.value, str):
        shown = repr(expr.value) if isinstance(expr, ast.Const) else "an expression"
        return None, f"a quoted tensor pattern, e.g. '{{prefix}}layers.{{i}}.scale', got {shown}"
    pattern = parse_text(Located(expr.value, expr.span, quoted=True), "pattern")
    if not isinstance(pattern, ast.Pattern):
        return None, f"a tensor pattern ({pattern.message})"
    if pattern.stack_index is not None or pattern.subtree:
        return None, "a pattern naming one whole tensor (no [{...}] slice, no '.**')"
    return pattern, None


_ARGUMENT_KINDS = {"number": _number_argument, "dtype": _dtype_argument, "pattern": _pattern_argument}


def _listed(names) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


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
                       for p in seg) for seg in pattern.segments) + ((("**",),) if pattern.subtree else ())
