"""Pass `resolve`: rule templates x one HF config -> an unchecked `Plan` (one mapping or sentinel per tensor).

In: `templates.Templates` (from `lower`, or printed into an emitted bridge) and an HF config. Refuses a config
outside the spec's `requires:`, binds the architecture's prefix and sub-config, evaluates the config mapping,
expands every rule over its captures (layers, then experts, then enums), evaluates predicates, layout sizes,
absent parts and op arguments, and builds each IR node through the op table (`ops`). Coverage and shapes are
proved by `check`. The interpreter and every emitted bridge run this same code; they differ only in how a
`Value` is computed (a spec expression evaluated, or a function printed from it). Imports no parser.

Config-dependent mistakes are `SpecError`s at the expression (or entry) that failed; a wrong architecture or
format is a `UsageError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping as AbcMapping

from ..dsl.diagnostics import DiagnosticSink, Span
from ..errors import UsageError
from . import ir, ops
from .evaluate import MISSING, Budget, EvalError, Scope, config_value, evaluate
from .templates import (
    EXPERT,
    LAYER,
    Architecture,
    Key,
    LayoutTemplate,
    MappingProduct,
    Rule,
    SentinelProduct,
    Templates,
    Value,
    digest,  # noqa: F401  (the spec digest is the templates' business; kept importable here)
)

MAX_EXPANSION = 1_000_000  # (layer, expert) pairs of one config (real models: ~15,000); an absurd config is refused


def select_architecture(templates, hf_config, architecture: str | None) -> Architecture:
    """The served architecture named by `architecture`, else by the config's `architectures`, else the first.
    `templates`: `Templates` or an `ast.Spec` (both list `architectures` with name, prefix and config)."""
    listed = config_value(hf_config, "architectures")
    first = listed[0] if isinstance(listed, list | tuple) and listed and isinstance(listed[0], str) else None
    wanted = architecture or first
    for arch in templates.architectures:
        if arch.name == wanted:
            return arch
    if architecture is None and wanted is None and templates.architectures:
        return templates.architectures[0]
    names = ", ".join(a.name for a in templates.architectures)
    spec = templates.spec if isinstance(templates, Templates) else templates.name
    raise UsageError(f"spec '{spec}' does not serve architecture {wanted!r} (it serves: {names})")


class SpecNames(AbcMapping):
    """What a spec's config names read: `architecture` (the name of the class converted), then the fields of the
    architecture's sub-config, then those of the whole config (e.g. `vision_config` beside the `text_config` of a
    vision-language model). Fields are looked up, never listed."""

    def __init__(self, hf_config, arch: Architecture):
        self._architecture, self._configs = arch.name, (text_config(hf_config, arch), hf_config)

    def __getitem__(self, name: str):
        if name == "architecture":
            return self._architecture
        for config in self._configs:
            value = config_value(config, name)
            if value is not MISSING:
                return value
        raise KeyError(name)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def text_config(hf_config, arch: Architecture):
    """The (sub-)config the spec's names refer to, e.g. `text_config` of a vision-language model."""
    if arch.config is None:
        return hf_config
    sub = config_value(hf_config, arch.config)
    return hf_config if sub is MISSING or sub is None else sub


def resolve(spec, hf_config, architecture: str | None = None, fmt: str | None = None) -> ir.Plan:
    """`spec`: `Templates`, or a validated `ast.Spec` (lowered first; its diagnostics then show the spec text)."""
    templates, sources = _templates(spec)
    arch = select_architecture(templates, hf_config, architecture)
    fmt = fmt or templates.formats[0]
    if fmt not in templates.formats:
        raise UsageError(f"spec '{templates.spec}' has no HF format '{fmt}' "
                         f"(formats: {', '.join(templates.formats)})")
    sink = DiagnosticSink(sources)
    values = _Values(SpecNames(hf_config, arch), templates.symbols)
    _check_requirements(templates, values, sink)
    sink.raise_if_any()
    config = _config_entries(templates, values, sink)
    domains = _domains(templates, config, sink)
    mappings, sentinels, subtrees = [], [], []
    for rule in templates.rules:
        if rule.format is None or rule.format == fmt:
            for item in _expand(rule, values, arch.prefix, domains, sink):
                {ir.Sentinel: sentinels, ir.Subtree: subtrees}.get(type(item), mappings).append(item)
    sink.raise_if_any()
    return ir.Plan(templates.spec, templates.file, templates.digest, arch.name, arch.prefix, fmt, templates.model,
                   config, tuple(mappings), tuple(sentinels), len(domains[LAYER]), len(domains[EXPERT]),
                   ir.stacks_of(mappings), tuple(subtrees))


def _templates(spec) -> tuple[Templates, dict[str, str]]:
    if isinstance(spec, Templates):
        return spec, {}
    from .lower import lower  # the parser's side: only a spec (not a bridge) needs it

    return lower(spec), spec.texts


def check_requirements(spec, hf_config, architecture: str | None = None) -> None:
    """Refuse a config the spec does not support (e.g. a RoPE scaling it does not model) before anything else:
    a conversion that would be silently wrong is an error naming the requirement."""
    templates, sources = _templates(spec)
    sink = DiagnosticSink(sources)
    arch = select_architecture(templates, hf_config, architecture)
    _check_requirements(templates, _Values(SpecNames(hf_config, arch), templates.symbols), sink)
    sink.raise_if_any()


def _check_requirements(templates: Templates, values: "_Values", sink: DiagnosticSink) -> None:
    for requirement in templates.requires:
        try:
            if not values(requirement.value, {}):
                sink.error(requirement.value.span, f"this HF config is not supported by the spec: the requirement "
                                                   f"'{requirement.text}' is false")
        except EvalError as exc:
            sink.error(exc.span, exc.message)


def _config_entries(templates: Templates, values: "_Values", sink: DiagnosticSink) -> tuple[ir.ConfigEntry, ...]:
    entries = []
    for entry in templates.config:
        try:
            entries.append(ir.ConfigEntry(entry.section, entry.field, values(entry.value, {}), entry.hf_path,
                                          entry.span))
        except EvalError as exc:
            sink.error(exc.span, exc.message)
    return tuple(entries)


def _domains(templates: Templates, config, sink: DiagnosticSink) -> dict[str, range]:
    """Layer and expert indices: `num_layers` (at least 1 when given) and `num_moe_experts` (0 or more; absent,
    null or false: none); an absurd count (more than `MAX_EXPANSION` (layer, expert) pairs) is refused."""
    domains = {LAYER: range(0), EXPERT: range(0)}
    for kind, name, least in ((LAYER, "num_layers", 1), (EXPERT, "num_moe_experts", 0)):
        entry = next((e for e in config if e.field == name), None)
        if entry is None or entry.value is None or entry.value is False:
            continue
        value = entry.value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            sink.error(entry.span, f"'{name}' must be an integer of at least {least}, the HF config gives "
                                   f"{entry.value!r}")
            continue
        domains[kind] = range(value)
    pairs = len(domains[LAYER]) * max(len(domains[EXPERT]), 1)
    if pairs > MAX_EXPANSION:  # an absurd config would expand for ever
        entry = next(e for e in config if e.field == "num_layers")
        sink.error(entry.span, f"this config has {len(domains[LAYER])} layers x {len(domains[EXPERT])} experts: more "
                               f"than the {MAX_EXPANSION:,} (layer, expert) pairs a spec may expand over")
        return {LAYER: range(0), EXPERT: range(0)}
    return domains


# ---------------------------------------------------------------- values


class _Values:
    """Computes `Value`s for one config, once per distinct value of the names each reads (a 30-layer,
    128-expert model expands to ~8,000 mappings; a per-layer size is computed 30 times, not 8,000)."""

    def __init__(self, config, symbols):
        self.config, self.symbols = config, {s.name: s for s in symbols}
        self.budget = Budget()  # the evaluations of one resolve are bounded together
        self.memo: dict[tuple, object] = {}

    def shared(self, key: tuple, build):
        """One object per distinct `key` in this resolve (equal layouts and programs are one object: less to
        build, hash and invert)."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def __call__(self, value: Value, env: dict):
        key = (id(value), tuple([env[n] for n in value.names]))
        if key not in self.memo:
            self.memo[key] = self._compute(value, env)  # an exception memoises nothing
        return self.memo[key]

    def _compute(self, value: Value, env: dict):
        if not callable(value.expr):
            captures = tuple((n, env[n]) for n in value.names)
            return evaluate(value.expr, Scope(self.config, self.symbols, captures, self.budget))
        try:  # a function printed from the expression (an emitted bridge)
            return value.expr(self.config, *(env[n] for n in value.names))
        except EvalError as exc:
            raise exc.at(value.span) from None
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise EvalError(value.span, f"cannot evaluate: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- rules


class _RuleError(Exception):
    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span = span


def _expand(rule: Rule, values: _Values, prefix: str, domains: dict, sink: DiagnosticSink):
    """The rule's IR nodes, one per capture combination (its first error ends the rule, as a diagnostic)."""
    names = [name for name, _ in rule.captures]
    ranges = [domains[d] if d in (LAYER, EXPERT) else d for _, d in rule.captures]
    layer, expert = rule.capture_of(LAYER), rule.capture_of(EXPERT)
    for combination in itertools.product(*ranges):
        env = dict(zip(names, combination), prefix=prefix)
        try:
            if rule.when is not None and not values(rule.when, env):
                continue
            product = rule.product
            if isinstance(product, MappingProduct):
                yield _mapping(rule, product, env, values, env.get(layer), env.get(expert))
            elif isinstance(product, SentinelProduct):
                yield ir.Sentinel(product.side, product.key.format(env), product.kind, product.reason, rule.index,
                                  product.span)
            else:
                yield ir.Subtree(rule.index, rule.span, product.hf.format(env), product.mcore.format(env))
        except EvalError as exc:
            sink.error(exc.span, exc.message)
            return
        except _RuleError as exc:
            sink.error(exc.span, str(exc))
            return


def _mapping(rule: Rule, product: MappingProduct, env: dict, values: _Values, layer, expert) -> ir.Mapping:
    absent = tuple(a for a in product.absent if a.when is None or values(a.when, env))
    layout = _layout(product.layout, env, values) if product.layout is not None else None
    hf_layout = _layout(product.hf_layout, env, values) if product.hf_layout is not None else None
    calls = tuple(_op(call, env, values) for call in product.ops if call.when is None or values(call.when, env))
    key = ("program", id(product), tuple(map(id, absent)), id(layout), id(hf_layout), calls)
    program = values.shared(key, lambda: (
        *((ir.SplitSource(hf_layout),) if hf_layout is not None else ()),
        *(ir.FillAbsent(a.part, a.policy, a.source_part, a.span) for a in absent),
        *((ir.Fuse(layout),) if layout is not None else ()), *calls))
    gone = {a.part for a in absent}
    sources = tuple(ir.Source(p.name, p.key.format(env), env[p.stack] if p.stack else None)
                    for p in product.sources if p.name not in gone)
    exact = values.shared(("exact", id(program)), lambda: ops.exact(program))
    return ir.Mapping(rule.index, rule.span, product.mcore.format(env), sources, product.shard, program,
                      layer=layer, expert=expert, exact=exact)


def _layout(template: LayoutTemplate, env: dict, values: _Values) -> ir.Layout:
    bound: dict[str, int] = {}
    for name, value in template.bindings:
        bound[name] = _positive_int(values(value, {**env, **bound}), name, value.span)
    inner = {**env, **bound} if bound else env
    parts = tuple((name, 1 if value is None else _positive_int(values(value, inner), name, value.span))
                  for name, value in template.parts)

    def build() -> ir.Layout:
        axes = {f for dim in template.dims for f in dim}
        return ir.Layout(template.dims, tuple((k, v) for k, v in bound.items() if k in axes), parts, template.text)
    return values.shared(("layout", id(template), tuple(bound.values()), parts), build)


def _op(call, env: dict, values: _Values) -> ir.Op:
    row = ops.SPEC_OPS[call.op]
    args = [values(a, env) if isinstance(a, Value) else a.format(env) if isinstance(a, Key) else a
            for a in call.args]
    try:
        return row.build(*args)
    except ops.OpArgumentError as exc:
        raise _RuleError(call.span, f"{row.name} {exc}") from None


def _positive_int(value, name: str, span: Span) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _RuleError(span, f"size of '{name}' must be a positive integer, got {value!r}")
    return value

