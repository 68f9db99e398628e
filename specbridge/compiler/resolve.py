"""Pass `resolve`: a validated spec + an HF config -> concrete mappings and sentinels (one per tensor).

Binds the architecture's prefix and sub-config, evaluates the config section, expands every rule over its
captures (layers, experts, enums), evaluates predicates, per-layer geometry, absent parts and ops. The result is
an unchecked `Plan`: coverage and shapes are proved by the `check` pass.
"""

from __future__ import annotations

import hashlib
import itertools

from ..dsl import ast
from ..dsl.diagnostics import DiagnosticSink, Span
from ..dsl.expressions import parse as parse_text
from ..dsl.yaml_source import Located
from . import ir
from ..errors import UsageError
from .evaluate import MISSING, EvalError, Scope, config_value, evaluate
from .validate import captures_of

LAYER, EXPERT = "layer", "expert"


def select_architecture(spec: ast.Spec, hf_config, architecture: str | None) -> ast.Architecture:
    names = [a.name for a in spec.architectures]
    listed = config_value(hf_config, "architectures")
    wanted = architecture or next(iter(listed if listed is not MISSING and listed else []), None)
    for arch in spec.architectures:
        if arch.name == wanted:
            return arch
    if architecture is None and wanted is None and spec.architectures:
        return spec.architectures[0]
    raise UsageError(f"spec '{spec.name}' does not serve architecture {wanted!r} (it serves: {', '.join(names)})")


def text_config(hf_config, arch: ast.Architecture):
    """The (sub-)config the spec's names refer to, e.g. `text_config` of a vision-language model."""
    if arch.config is None:
        return hf_config
    sub = config_value(hf_config, arch.config)
    return hf_config if sub is MISSING or sub is None else sub


def resolve(spec: ast.Spec, hf_config, architecture: str | None = None, fmt: str | None = None) -> ir.Plan:
    sink = DiagnosticSink(spec.texts)
    arch = select_architecture(spec, hf_config, architecture)
    fmt = fmt or spec.formats[0]
    if fmt not in spec.formats:
        raise UsageError(f"spec '{spec.name}' has no HF format '{fmt}' (formats: {', '.join(spec.formats)})")
    scope = Scope(text_config(hf_config, arch), {s.name: s for s in spec.symbols})
    config = _config_entries(spec, scope, sink)
    values = {e.field: e.value for e in config}
    domains = {LAYER: range(int(values.get("num_layers") or 0)), EXPERT: range(int(values.get("num_moe_experts") or 0))}
    expander = _RuleExpander(scope, arch.prefix, domains, sink)
    mappings, sentinels = [], []
    for rule in spec.rules:
        if rule.format is not None and rule.format != fmt:
            continue
        for item in expander.expand(rule):
            (sentinels if isinstance(item, ir.Sentinel) else mappings).append(item)
    sink.raise_if_any()
    stacks = ir.stacks_of(mappings)
    return ir.Plan(spec.name, spec.file, digest(spec.merged_source), arch.name, arch.prefix, fmt, spec.model,
                   tuple(config), tuple(mappings), tuple(sentinels), len(domains[LAYER]), len(domains[EXPERT]),
                   stacks)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config_entries(spec: ast.Spec, scope: Scope, sink: DiagnosticSink) -> list[ir.ConfigEntry]:
    entries = []
    for section, fields in (("transformer", spec.transformer), ("model_args", spec.model_args)):
        for f in fields:
            try:
                value = evaluate(f.expr, scope)
            except EvalError as exc:
                sink.error(exc.span, exc.message)
                continue
            entries.append(ir.ConfigEntry(section, f.field, value, _hf_path(f.expr, scope), f.span))
    return entries


def _hf_path(expr, scope: Scope) -> str | None:
    """`hidden_size` or `rope_parameters.rope_theta` name an HF field directly: they can be written back."""
    if isinstance(expr, ast.Name) and expr.id not in scope.symbols:
        return expr.id
    if isinstance(expr, ast.Attribute):
        inner = _hf_path(expr.value, scope)
        return f"{inner}.{expr.attr}" if inner else None
    return None


class _RuleExpander:
    """Expands one rule over its captures into `ir.Mapping`s or `ir.Sentinel`s.

    Speed (a 30-layer, 128-expert model expands to ~8,000 mappings): every expression and every per-rule
    product (layout, absent parts, ops, shard) is evaluated once per distinct value of the captures it
    actually names, not once per capture combination; keys are built from a format template per pattern.
    Results are identical to evaluating everything per combination: a name that is not a capture resolves to
    the same symbol, builtin or config field throughout one `resolve` call.
    """

    def __init__(self, scope: Scope, prefix: str, domains: dict, sink: DiagnosticSink):
        self.scope, self.prefix, self.domains, self.sink = scope, prefix, domains, sink
        self._templates: dict[int, tuple[ast.Pattern, str]] = {}
        self._names: dict[int, tuple[object, tuple[str, ...] | None]] = {}
        self._memo: dict[tuple, object] = {}

    def expand(self, rule: ast.Rule):
        kinds = captures_of(rule)
        names = sorted(kinds)
        domains = [self._domain(kinds[n]) for n in names]
        for values in itertools.product(*domains):
            captures = dict(zip(names, values))
            scope = self.scope.with_captures(**captures)
            try:
                if rule.when is not None and not self._eval(rule.when, scope, captures):
                    continue
                yield self._sentinel(rule, scope) if rule.sentinel else self._mapping(rule, scope, kinds, captures)
            except EvalError as exc:
                self.sink.error(exc.span, exc.message)
                return
            except _RuleError as exc:
                self.sink.error(exc.span, str(exc))
                return

    def _domain(self, kind: tuple[str, ...]):
        if kind == (LAYER,):
            return self.domains[LAYER]
        if kind == (EXPERT,):
            return self.domains[EXPERT]
        return kind

    # ------------------------------------------------------------ memoisation on the captures a thing names

    def _free(self, node) -> tuple[str, ...] | None:
        """Names an expression (or tuple of expressions) mentions, sorted; None: unknown node, depends on
        everything."""
        entry = self._names.get(id(node))
        if entry is None:
            names = _free_names(node)
            entry = (node, None if names is None else tuple(sorted(names)))  # holds `node`: its id stays unique
            self._names[id(node)] = entry
        return entry[1]

    def _deps(self, node, captures: dict) -> tuple | None:
        names = self._free(node)
        if names is None:
            return None
        return tuple([captures.get(n, MISSING) for n in names])

    def _cached(self, what: str, owner, node, captures: dict, compute):
        """`compute()` once per (what, owner, values of the captures `node` names)."""
        deps = self._deps(node, captures)
        if deps is None:
            return compute()
        key = (what, id(owner), deps)
        if key not in self._memo:
            self._memo[key] = compute()  # an exception caches nothing
        return self._memo[key]

    def _eval(self, expr, scope: Scope, captures: dict):
        return self._cached("eval", expr, expr, captures, lambda: evaluate(expr, scope))

    # ------------------------------------------------------------ keys

    def key(self, pattern: ast.Pattern, scope: Scope) -> str:
        return self._key(pattern, dict(scope.captures))

    def _key(self, pattern: ast.Pattern, captures: dict) -> str:
        entry = self._templates.get(id(pattern))
        if entry is None:
            entry = self._templates[id(pattern)] = (pattern, self._template(pattern))
        return entry[1].format_map(captures)

    def _template(self, pattern: ast.Pattern) -> str:
        """`str.format` template of the key: literals and the prefix escaped, captures as `{name}`."""
        def piece(p) -> str:
            if isinstance(p, ast.Literal):
                return _escape(p.text)
            if p.name == "prefix":
                return _escape(self.prefix)
            return "{" + p.name + "}"
        return ".".join("".join(piece(p) for p in segment) for segment in pattern.segments)

    # ------------------------------------------------------------ products

    def _sentinel(self, rule: ast.Rule, scope: Scope) -> ir.Sentinel:
        side, pattern = (ir.MCORE, rule.mcore) if rule.mcore is not None else (ir.HF, rule.hf[0][1])
        call = rule.sentinel
        reason = str(evaluate(call.args[0], scope)) if call.args else ""
        return ir.Sentinel(side, self.key(pattern, scope), call.name, reason, rule.index, call.span)

    def _mapping(self, rule: ast.Rule, scope: Scope, kinds: dict, captures: dict) -> ir.Mapping:
        absent = self._cached("absent", rule, rule.absent, captures, lambda: self._absent(rule, scope))
        absent_parts = {op.part for op in absent}
        sources = tuple(
            ir.Source(part, self._key(p, captures), captures[p.stack_index.name] if p.stack_index else None)
            for part, p in rule.hf if part not in absent_parts)
        if rule.layout is not None:
            layout, shard = self._cached("layout", rule, rule.layout, captures, lambda: self._layout_shard(rule, scope))
        else:
            layout, shard = None, self._cached("shard", rule, None, captures, lambda: _shard(rule, None))
        ops = self._cached("ops", rule, rule.ops, captures, lambda: tuple(self._ops(rule, scope)))
        program = (*absent, *((ir.Fuse(layout),) if layout is not None else ()), *ops)
        layer = next((captures[n] for n, k in kinds.items() if k == (LAYER,)), None)
        expert = next((captures[n] for n, k in kinds.items() if k == (EXPERT,)), None)
        exact = not any(isinstance(op, ir.AddConst | ir.ScaleBy) for op in program)
        return ir.Mapping(rule.index, rule.span, self._key(rule.mcore, captures), sources, shard,
                          program, layer=layer, expert=expert, exact=exact)

    def _layout_shard(self, rule: ast.Rule, scope: Scope) -> tuple[ir.Layout, ir.Shard]:
        layout = self._layout(rule, scope)
        return layout, _shard(rule, layout)

    def _absent(self, rule: ast.Rule, scope: Scope) -> tuple[ir.FillAbsent, ...]:
        out = []
        for part, call in rule.absent:
            if call.when is not None and not evaluate(call.when, scope):
                continue
            copy_of = call.kwarg("copy_of")
            if copy_of is not None:
                out.append(ir.FillAbsent(part, "copy_of", copy_of.id, call.span))
            else:
                out.append(ir.FillAbsent(part, "zeros", None, call.span))
        return tuple(out)

    def _layout(self, rule: ast.Rule, scope: Scope) -> ir.Layout:
        layout = rule.layout
        bound: dict[str, object] = {}
        for name, expr in layout.bindings:
            bound[name] = _positive_int(evaluate(expr, scope.with_captures(**bound)), name, expr.span)
        inner = scope.with_captures(**bound)
        dims, parts = [], []
        for dim in layout.dims:
            factors = []
            for factor in dim:
                if isinstance(factor, ast.Parts):
                    factors.append(ir.BRACKET)
                    parts.extend((p.name, 1 if p.size is None else
                                  _positive_int(evaluate(p.size, inner), p.name, p.span)) for p in factor.parts)
                else:
                    factors.append(factor.name)
            dims.append(tuple(factors))
        axes = {f for d in dims for f in d}
        sizes = tuple((k, v) for k, v in bound.items() if k in axes)
        return ir.Layout(tuple(dims), sizes, tuple(parts), layout.text.split(" with ")[0].strip())

    def _ops(self, rule: ast.Rule, scope: Scope):
        for call in rule.ops:
            if call.when is not None and not evaluate(call.when, scope):
                continue
            if call.name == "add":
                yield ir.AddConst(float(evaluate(call.args[0], scope)))
            elif call.name == "cast":
                yield ir.Cast(_dtype_name(call.args[0], scope))
            elif call.name == "scale":
                yield ir.ScaleBy(self._scale_key(call, scope))

    def _scale_key(self, call: ast.Call, scope: Scope) -> str:
        by = call.kwarg("by") or call.args[0]
        text = evaluate(by, scope)
        pattern = parse_text(Located(text, by.span, quoted=True), "pattern")
        if not isinstance(pattern, ast.Pattern):
            raise _RuleError(by.span, f"scale(by=...) must name a tensor pattern: {pattern.message}")
        return self.key(pattern, scope)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _free_names(node) -> frozenset[str] | None:
    """Every `Name` an expression mentions (symbol bodies excluded: they never see rule captures), over
    expressions, tuples of them, layouts, calls and the `(part, call)` pairs of `absent`. A scale op's pattern
    text names captures too, so a `scale` call depends on everything (None), as does any unknown node."""
    match node:
        case None | ast.Const() | str():
            return frozenset()
        case ast.Name(id=name):
            return frozenset((name,))
        case tuple() | list():
            out = frozenset()
            for item in node:
                names = _free_names(item)
                if names is None:
                    return None
                out |= names
            return out
        case ast.ListExpr(items=items):
            return _free_names(items)
        case ast.BinOp(left=left, right=right):
            return _free_names((left, right))
        case ast.UnaryOp(operand=operand):
            return _free_names(operand)
        case ast.IfElse(cond=cond, then=then, other=other):
            return _free_names((cond, then, other))
        case ast.CallExpr(func=func, args=args):
            return _free_names((func, args))
        case ast.Subscript(value=value, index=index):
            return _free_names((value, index))
        case ast.Attribute(value=value):
            return _free_names(value)
        case ast.Layout(bindings=bindings, dims=dims):
            sizes = [p.size for dim in dims for f in dim if isinstance(f, ast.Parts) for p in f.parts]
            return _free_names((tuple(e for _, e in bindings), tuple(sizes)))  # binding names included: harmless
        case ast.Call(name="scale"):
            return None
        case ast.Call(args=args, kwargs=kwargs, when=when):
            return _free_names((args, tuple(e for _, e in kwargs), when))
    return None


def _dtype_name(expr, scope: Scope) -> str:
    return expr.id if isinstance(expr, ast.Name) else str(evaluate(expr, scope))


class _RuleError(Exception):
    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span = span


def _positive_int(value, name: str, span: Span) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _RuleError(span, f"size of '{name}' must be a positive integer, got {value!r}")
    return value


def _shard(rule: ast.Rule, layout: ir.Layout | None) -> ir.Shard:
    kind = rule.shard
    if kind == "replicated":
        return ir.Shard("replicated")
    if kind == "vocab":
        return ir.Shard("vocab", dim=0)
    if kind in ("column", "row"):
        dim = 0 if kind == "column" else 1
        axis = layout.dims[dim][0] if layout is not None else None
        return ir.Shard("axis", axis=axis, dim=dim)
    dim = next(k for k, d in enumerate(layout.dims) if kind in d)
    return ir.Shard("axis", axis=kind, dim=dim)
