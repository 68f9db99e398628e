"""Pass `emit`: a validated spec -> the source text of a standalone, readable Python bridge module.

In: an `ast.Spec` (parsed and validated). Out: deterministic Python source (`specbridge compile SPEC -o FILE`)
whose `plan(hf_config, architecture, fmt)` equals `compile_plan(spec, hf_config, architecture, fmt)` for every
HF config, without the spec file, YAML or the expression parser: it imports only torch and
`specbridge.runtime.bridge`. Symbols become functions `sym_<name>(cfg, *params)`; HF config fields are read
with `field(cfg, name)`; each rule becomes a generator `rule_<index>(cfg, prefix, layers, experts)` that loops
over its captures in the resolver's order, tests its `when` predicates with `if`, computes the layout sizes
inline and yields `Mapping`s or `Sentinel`s carrying the spec's spans as literals.
"""

from __future__ import annotations

import json
import keyword
import math
import re
from dataclasses import dataclass

from ..dsl import ast
from ..dsl.diagnostics import Span
from ..dsl.expressions import parse as parse_text
from ..dsl.printer import to_text
from ..dsl.yaml_source import Located
from . import ir
from .evaluate import FUNCTIONS
from .resolve import EXPERT, LAYER, digest
from .validate import captures_of

WIDTH = 119
INDENT = "    "
IMPORTS = ("BRACKET", "AddConst", "Cast", "ConfigEntry", "FillAbsent", "Fuse", "Layout", "Mapping", "Plan",
           "ScaleBy", "Sentinel", "Shard", "Source", "Span", "field", "invert", "order", "pattern_key",
           "run_export", "run_import", "select_architecture", "size", "stacks_of", "text_config")
# names the generated code uses itself: a capture, binding or parameter spelled like one gets a trailing "_"
RESERVED = {*IMPORTS, *FUNCTIONS, "cfg", "prefix", "layers", "experts", "layout", "program", "absent", "torch",
            "functools", "range", "tuple", "isinstance", "any", "FILE", "SPEC", "DIGEST", "MODEL", "ARCHITECTURES",
            "FORMATS", "RULES"}


def emit_module(spec: ast.Spec) -> str:
    """The bridge module's source text for `spec` (deterministic: same spec text and file name, same bytes)."""
    return _Emitter(spec).module()


# ---------------------------------------------------------------- a tiny pretty printer (ruff-like wrapping)


@dataclass(frozen=True, slots=True)
class _Call:
    """`head(args...)`, rendered on one line when it fits, else one argument per line with a trailing comma."""

    head: str
    args: tuple
    tuple_: bool = False  # a tuple display: `(a,)` for one element


def _flat(node) -> str:
    if isinstance(node, str):
        return node
    inner = ", ".join(_flat(a) for a in node.args)
    if node.tuple_ and len(node.args) == 1:
        inner += ","
    return f"{node.head}({inner})"


def _render(node, indent: str, lead: str = "", trail: str = "") -> list[str]:
    """Lines for `lead + node + trail` at `indent`, wrapped to WIDTH."""
    flat = f"{indent}{lead}{_flat(node)}{trail}"
    if isinstance(node, str) or len(flat) <= WIDTH or not node.args:
        return [flat]
    lines = [f"{indent}{lead}{node.head}("]
    for arg in node.args:
        lines.extend(_render(arg, indent + INDENT, trail=","))
    lines.append(f"{indent}){trail}")
    return lines


def _tuple(items) -> _Call:
    return _Call("", tuple(items), tuple_=True)


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _literal(value) -> str:
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    if isinstance(value, tuple):
        return _flat(_tuple(_literal(v) for v in value))
    return repr(value)


# ---------------------------------------------------------------- expressions -> Python source

_PREC = {"or": 2, "and": 3, "==": 5, "!=": 5, "<": 5, "<=": 5, ">": 5, ">=": 5, "in": 5, "+": 7, "-": 7, "*": 8,
         "/": 8, "//": 8, "%": 8, "**": 10}
_IFELSE, _NOT, _NEG, _ATOM = 1, 4, 9, 11


class _Expr:
    """Translates spec expressions. `env` maps capture, binding and parameter names to Python locals;
    other names are symbols (`sym_x(cfg)`), builtins, or HF config fields (`field(cfg, "x")`)."""

    def __init__(self, symbols: dict[str, ast.SymbolDef], emitter: "_Emitter"):
        self.symbols, self.emitter = symbols, emitter

    def __call__(self, node, env: dict[str, str]) -> str:
        return self.code(node, env)[0]

    def wrap(self, node, env, lowest: int) -> str:
        """Source of `node`, parenthesised unless its precedence is at least `lowest`."""
        text, prec = self.code(node, env)
        return text if prec >= lowest else f"({text})"

    def code(self, node, env: dict[str, str]) -> tuple[str, int]:
        match node:
            case ast.Const(value=value):
                prec = _NEG if isinstance(value, int | float) and not isinstance(value, bool) and value < 0 else _ATOM
                return _literal(value), prec
            case ast.Name(id=name):
                return self.name(name, env), _ATOM
            case ast.ListExpr(items=items):
                return "[" + ", ".join(self(i, env) for i in items) + "]", _ATOM
            case ast.BinOp(op="**", left=left, right=right):
                return f"{self.wrap(left, env, _ATOM)} ** {self.wrap(right, env, _NEG)}", _PREC["**"]
            case ast.BinOp(op=op, left=left, right=right):
                prec = _PREC[op]
                left_min = prec + 1 if prec == 5 else prec
                return f"{self.wrap(left, env, left_min)} {op} {self.wrap(right, env, prec + 1)}", prec
            case ast.UnaryOp(op="not", operand=operand):
                return f"not {self.wrap(operand, env, _NOT)}", _NOT
            case ast.UnaryOp(op="-", operand=operand):
                text, prec = self.code(operand, env)
                return (f"-{text}" if prec > _NEG or prec == _NEG and not text.startswith("-") else f"-({text})"), _NEG
            case ast.IfElse(cond=cond, then=then, other=other):
                return (f"{self.wrap(then, env, _IFELSE + 1)} if {self.wrap(cond, env, _IFELSE + 1)} "
                        f"else {self.wrap(other, env, _IFELSE)}"), _IFELSE
            case ast.CallExpr(func=func, args=args):
                return self.call(func, args, env), _ATOM
            case ast.Subscript(value=value, index=index):
                return f"{self.wrap(value, env, _ATOM)}[{self(index, env)}]", _ATOM
            case ast.Attribute(value=value, attr=attr):
                return f"field({self(value, env)}, {_q(attr)})", _ATOM
        raise TypeError(f"cannot emit {type(node).__name__}")

    def name(self, name: str, env: dict[str, str]) -> str:
        if name in env:
            return env[name]
        symbol = self.symbols.get(name)
        if symbol is not None:
            if symbol.params:
                self.emitter.needs_functools = True
                return f"functools.partial(sym_{name}, cfg)"
            return f"sym_{name}(cfg)"
        if name in FUNCTIONS:
            return name
        return f"field(cfg, {_q(name)})"

    def call(self, func, args, env) -> str:
        arg_text = [self(a, env) for a in args]
        if isinstance(func, ast.Name) and func.id not in env and func.id in self.symbols:
            symbol = self.symbols[func.id]
            if symbol.params:
                if len(args) != len(symbol.params):
                    raise ValueError(f"{func.span}: symbol '{symbol.name}' takes {len(symbol.params)} argument(s), "
                                     f"got {len(args)}")
                return f"sym_{func.id}(" + ", ".join(["cfg", *arg_text]) + ")"
        return f"{self.wrap(func, env, _ATOM)}(" + ", ".join(arg_text) + ")"


def _local(name: str, taken=()) -> str:
    """A Python local for a spec name (captures, bindings, parameters), avoiding the generated code's names."""
    out = name
    while keyword.iskeyword(out) or out in RESERVED or out.startswith("sym_") or out.startswith("rule_") \
            or out in taken:
        out += "_"
    return out


# ---------------------------------------------------------------- the module


class _Emitter:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.symbols = {s.name: s for s in spec.symbols}
        self.expr = _Expr(self.symbols, self)
        self.needs_functools = False

    def span(self, span: Span) -> str:
        file = "FILE" if span.file == self.spec.file else _q(span.file)
        return f"Span({file}, {span.line}, {span.column}, {span.length})"

    def module(self) -> str:
        body = [*self.constants(), *self.symbol_functions(), *self.config_function(), *self.rule_functions(),
                *self.plan_function(), *_CONVERSIONS]
        return "\n".join([*self.header(body), *body]).rstrip("\n") + "\n"

    def header(self, body: list[str]) -> list[str]:
        spec, text = self.spec, "\n".join(body)
        used = tuple(name for name in IMPORTS if re.search(rf"\b{name}\b", text))
        lines = [
            f'"""Bridge for spec {_q(spec.name)}: Hugging Face <-> megatron-core weight mappings, as plain Python.',
            "",
            f"Generated by `specbridge compile` from {spec.file} (digest {digest(spec.merged_source)}).",
            "Do not edit: change the spec and compile again. `plan(hf_config)` equals the interpreted compiler's",
            "`compile_plan` for the same spec and config; `hf_to_mcore` / `mcore_to_hf` convert tensors by it.",
            '"""',
            "",
            "from __future__ import annotations",
            "",
            *(["import functools", ""] if self.needs_functools else []),
            "import torch",
            "",
        ]
        return lines + _render(_Call("from specbridge.runtime.bridge import ", used), "")

    def constants(self) -> list[str]:
        spec = self.spec
        archs = [f"    {_q(a.name)}: ({_q(a.prefix)}, {_literal(a.config)})," for a in spec.architectures]
        return ["", "", f"SPEC = {_q(spec.name)}", f"FILE = {_q(spec.file)}", f"DIGEST = {_q(digest(spec.merged_source))}",
                f"MODEL = {_q(spec.model)}", "ARCHITECTURES = {  # name -> (prefix, sub-config attribute)", *archs,
                "}", f"FORMATS = {_literal(tuple(spec.formats))}"]

    # ------------------------------------------------------------ symbols and config

    def symbol_functions(self) -> list[str]:
        out = []
        for symbol in self.spec.symbols:
            env = {}
            for p in symbol.params:
                env[p] = _local(p, env.values())
            params = ", ".join(["cfg", *env.values()])
            text = self.spec_line(symbol.span)
            out += ["", "", f"# {symbol.span}: {text}", f"def sym_{symbol.name}({params}):",
                    *_render(self.expr(symbol.expr, env), INDENT, lead="return ")]
        return out

    def spec_line(self, span: Span) -> str:
        return self.spec.line(span)

    def config_function(self) -> list[str]:
        entries = []
        for section, fields in (("transformer", self.spec.transformer), ("model_args", self.spec.model_args)):
            for f in fields:
                entries.append(_Call("ConfigEntry", (_q(section), _q(f.field), self.expr(f.expr, {}),
                                                     _literal(self._hf_path(f.expr)), self.span(f.span))))
        lines = ["", "", "def config_entries(cfg) -> tuple[ConfigEntry, ...]:",
                 f'{INDENT}"""The Megatron config fields (mcore.transformer, mcore.model_args) from the HF (text) '
                 'config."""']
        if not entries:
            return [*lines, f"{INDENT}return ()"]
        lines.append(f"{INDENT}return (")
        for entry in entries:
            lines += _render(entry, INDENT * 2, trail=",")
        return [*lines, f"{INDENT})"]

    def _hf_path(self, expr) -> str | None:
        if isinstance(expr, ast.Name) and expr.id not in self.symbols:
            return expr.id
        if isinstance(expr, ast.Attribute):
            inner = self._hf_path(expr.value)
            return f"{inner}.{expr.attr}" if inner else None
        return None

    # ------------------------------------------------------------ rules

    def rule_functions(self) -> list[str]:
        out = []
        for rule in self.spec.rules:
            out += ["", "", *self.rule_comment(rule),
                    f"def rule_{rule.index}(cfg, prefix, layers, experts):", *self.rule_body(rule)]
        return out

    def rule_comment(self, rule: ast.Rule) -> list[str]:
        lines = [f"# {rule.span}: rule {rule.index}" + (f", format {rule.format}" if rule.format else "")]
        if rule.mcore is not None:
            lines.append(f"#   mcore: {rule.mcore.text}")
        for part, pattern in rule.hf:
            lines.append(f"#   hf:    {pattern.text}" if part == "x" and len(rule.hf) == 1
                         else f"#   hf {part}: {pattern.text}")
        if rule.sentinel is not None:
            lines.append(f"#   sentinel: {self.spec_line(rule.sentinel.span).split(':', 1)[-1].strip()}")
        return lines

    def rule_body(self, rule: ast.Rule) -> list[str]:
        kinds = captures_of(rule)
        env: dict[str, str] = {}
        lines, indent = [], INDENT
        for name in sorted(kinds):
            env[name] = _local(name, env.values())
            kind = kinds[name]
            domain = "layers" if kind == (LAYER,) else "experts" if kind == (EXPERT,) else _literal(kind)
            lines.append(f"{indent}for {env[name]} in {domain}:")
            indent += INDENT
        if rule.when is not None:
            lines += _render(self.expr(rule.when, env), indent, lead="if ", trail=":")
            indent += INDENT
        if rule.sentinel is not None:
            return lines + self.sentinel(rule, env, indent)
        return lines + self.mapping(rule, env, kinds, indent)

    def key(self, pattern: ast.Pattern, env: dict[str, str]) -> str:
        out, dynamic = [], False
        for segment in pattern.segments:
            text = ""
            for piece in segment:
                if isinstance(piece, ast.Literal):
                    text += piece.text.replace("{", "{{").replace("}", "}}")
                else:
                    text += "{" + ("prefix" if piece.name == "prefix" else env[piece.name]) + "}"
                    dynamic = True
            out.append(text)
        joined = ".".join(out)
        return f"f{_q(joined)}" if dynamic else _q(joined.replace("{{", "{").replace("}}", "}"))

    def sentinel(self, rule: ast.Rule, env, indent: str) -> list[str]:
        side, pattern = (ir.MCORE, rule.mcore) if rule.mcore is not None else (ir.HF, rule.hf[0][1])
        call = rule.sentinel
        if not call.args:
            reason = '""'
        elif isinstance(call.args[0], ast.Const) and isinstance(call.args[0].value, str):
            reason = _q(call.args[0].value)
        else:
            reason = f"str({self.expr(call.args[0], env)})"
        node = _Call("Sentinel", (_q(side), self.key(pattern, env), _q(call.name), reason, str(rule.index),
                                  self.span(call.span)))
        return _render(node, indent, lead="yield ")

    def mapping(self, rule: ast.Rule, env, kinds, indent: str) -> list[str]:
        lines = []
        layout = None
        if rule.layout is not None:
            layout_lines, layout = self.layout(rule.layout, env, indent)
            lines += layout_lines
        dynamic = any(c.when is not None for _, c in rule.absent) or any(c.when is not None for c in rule.ops)
        absent = [(part, call) for part, call in rule.absent]
        sources = [_Call("Source", (_q(part), self.key(p, env),
                                    *([env[p.stack_index.name]] if p.stack_index is not None else [])))
                   for part, p in rule.hf]
        if dynamic:
            lines.append(f"{indent}program = []")
            for _, call in absent:
                lines += self.guarded(call, env, indent, f"program.append({_flat(self.fill(call, rule))})")
            if layout is not None:
                lines.append(f"{indent}program.append(Fuse(layout))")
            for call in rule.ops:
                lines += self.guarded(call, env, indent, f"program.append({_flat(self.op(call, env))})")
            if any(c.when is not None for _, c in absent):
                lines.append(f"{indent}absent = {{op.part for op in program if isinstance(op, FillAbsent)}}")
                lines += _render(_tuple(sources), indent, lead="sources = ")
                lines.append(f"{indent}sources = tuple(s for s in sources if s.part not in absent)")
                source_arg = "sources"
            else:
                gone = {part for part, _ in absent}
                source_arg = _tuple(s for s, (part, _) in zip(sources, rule.hf) if part not in gone)
            program_arg = "tuple(program)"
            inexact = [c for c in rule.ops if c.name in ("add", "scale")]
            exact = ("False" if any(c.when is None for c in inexact) else
                     "not any(isinstance(op, AddConst | ScaleBy) for op in program)" if inexact else "True")
        else:
            gone = {part for part, _ in absent}
            source_arg = _tuple(s for s, (part, _) in zip(sources, rule.hf) if part not in gone)
            program_arg = _tuple([*(self.fill(c, rule) for _, c in absent),
                                  *(["Fuse(layout)"] if layout is not None else []),
                                  *(self.op(c, env) for c in rule.ops)])
            exact = "False" if any(c.name in ("add", "scale") for c in rule.ops) else "True"
        layer = next((env[n] for n, k in kinds.items() if k == (LAYER,)), None)
        expert = next((env[n] for n, k in kinds.items() if k == (EXPERT,)), None)
        extra = [*([f"layer={layer}"] if layer else []), *([f"expert={expert}"] if expert else []),
                 *(["exact=False"] if exact == "False" else [f"exact={exact}"] if exact != "True" else [])]
        node = _Call("Mapping", (str(rule.index), self.span(rule.span), self.key(rule.mcore, env), source_arg,
                                 self.shard(rule, layout), program_arg, *extra))
        return lines + _render(node, indent, lead="yield ")

    def guarded(self, call: ast.Call, env, indent: str, statement: str) -> list[str]:
        if call.when is None:
            return [f"{indent}{statement}"]
        return [*_render(self.expr(call.when, env), indent, lead="if ", trail=":"), f"{indent}{INDENT}{statement}"]

    def fill(self, call: ast.Call, rule: ast.Rule) -> _Call:
        part = next(p for p, c in rule.absent if c is call)
        copy_of = call.kwarg("copy_of")
        policy = (_q("copy_of"), _q(copy_of.id)) if copy_of is not None else (_q("zeros"), "None")
        return _Call("FillAbsent", (_q(part), *policy, self.span(call.span)))

    def op(self, call: ast.Call, env) -> _Call:
        if call.name == "add":
            return _Call("AddConst", (f"float({self.expr(call.args[0], env)})",))
        if call.name == "cast":
            arg = call.args[0]
            return _Call("Cast", (_q(arg.id) if isinstance(arg, ast.Name) else f"str({self.expr(arg, env)})",))
        if call.name == "scale":
            return _Call("ScaleBy", (self.scale_key(call, env),))
        raise ValueError(f"{call.span}: unknown op '{call.name}'")

    def scale_key(self, call: ast.Call, env) -> str:
        by = call.kwarg("by") or call.args[0]
        if isinstance(by, ast.Const) and isinstance(by.value, str):
            pattern = parse_text(Located(by.value, by.span, quoted=True), "pattern")
            if isinstance(pattern, ast.Pattern) and all(p.name == "prefix" or p.name in env for p in pattern.pieces()
                                                        if not isinstance(p, ast.Literal)):
                return self.key(pattern, env)
        captures = "{" + ", ".join(f"{_q(n)}: {v}" for n, v in env.items()) + "}"
        return f"pattern_key({self.expr(by, env)}, prefix, {captures})"

    def layout(self, layout: ast.Layout, env: dict[str, str], indent: str):
        """Lines binding the layout's axis sizes, then `layout = Layout(...)`; returns (lines, factor names)."""
        lines, inner = [], dict(env)
        bound: dict[str, str] = {}
        for name, expr in layout.bindings:
            local = bound.get(name) or _local(name, [*env.values(), *bound.values()])
            lines += _render(_Call("size", (self.expr(expr, inner), _q(name))), indent, lead=f"{local} = ")
            bound[name] = local
            inner[name] = local
        dims, parts = [], []
        for dim in layout.dims:
            factors = []
            for factor in dim:
                if isinstance(factor, ast.Parts):
                    factors.append(ir.BRACKET)
                    parts += [_tuple((_q(p.name), "1" if p.size is None else
                                      _flat(_Call("size", (self.expr(p.size, inner), _q(p.name))))))
                              for p in factor.parts]
                else:
                    factors.append(factor.name)
            dims.append(tuple(factors))
        axes = {f for d in dims for f in d}
        dims_code = _tuple(_tuple("BRACKET" if f == ir.BRACKET else _q(f) for f in d) for d in dims)
        sizes = _tuple(_tuple((_q(k), v)) for k, v in bound.items() if k in axes)
        node = _Call("Layout", (dims_code, sizes, _tuple(parts), _q(layout.text.split(" with ")[0].strip())))
        return lines + _render(node, indent, lead="layout = "), tuple(dims)

    def shard(self, rule: ast.Rule, dims) -> str:
        kind = rule.shard
        if kind == "replicated":
            return 'Shard("replicated")'
        if kind == "vocab":
            return 'Shard("vocab", dim=0)'
        if kind in ("column", "row"):
            dim = 0 if kind == "column" else 1
            axis = dims[dim][0] if dims is not None else None
            return f'Shard("axis", axis={_literal(axis)}, dim={dim})'
        dim = next(k for k, d in enumerate(dims) if kind in d)
        return f'Shard("axis", axis={_q(kind)}, dim={dim})'

    # ------------------------------------------------------------ plan

    def plan_function(self) -> list[str]:
        rows = [f"    ({_literal(r.format)}, rule_{r.index})," for r in self.spec.rules]
        return [*self.requirements_function(), "", "", "RULES = (  # (HF format or None for all, rule)", *rows, ")",
                *_PLAN]

    def requirements_function(self) -> list[str]:
        lines = ["", "", "def check_requirements(cfg) -> None:",
                 f'{INDENT}"""Refuse a config the spec does not support (its `requires:`)."""']
        for requirement in self.spec.requires:
            where = str(requirement.span)
            message = f"{where}: this HF config is not supported by the spec: {to_text(requirement)}"
            lines += _render(self.expr(requirement, {}), INDENT, lead="if not (", trail="):")
            chunks = [message[k:k + 80] for k in range(0, len(message), 80)]
            lines += [f"{INDENT * 2}raise ValueError(", *(f"{INDENT * 3}{_q(c)}" for c in chunks), f"{INDENT * 2})"]
        if not self.spec.requires:
            lines.append(f"{INDENT}return None")
        return lines


_PLAN = '''

def plan(hf_config, architecture: str | None = None, fmt: str | None = None) -> Plan:
    """The spec compiled for one HF config: resolved, inverted and ordered, as the interpreted compiler does."""
    arch = select_architecture(SPEC, ARCHITECTURES, hf_config, architecture)
    prefix, sub_config = ARCHITECTURES[arch]
    fmt = fmt or FORMATS[0]
    if fmt not in FORMATS:
        raise ValueError(f"spec '{SPEC}' has no HF format '{fmt}' (formats: {', '.join(FORMATS)})")
    cfg = text_config(hf_config, sub_config)
    check_requirements(cfg)
    config = config_entries(cfg)
    values = {e.field: e.value for e in config}
    layers = range(int(values.get("num_layers") or 0))
    experts = range(int(values.get("num_moe_experts") or 0))
    items = [item for rule_format, rule in RULES if rule_format in (None, fmt)
             for item in rule(cfg, prefix, layers, experts)]
    mappings = tuple(item for item in items if isinstance(item, Mapping))
    sentinels = tuple(item for item in items if isinstance(item, Sentinel))
    resolved = Plan(SPEC, FILE, DIGEST, arch, prefix, fmt, MODEL, config, mappings, sentinels, len(layers),
                    len(experts), stacks_of(mappings))
    return order(invert(resolved))'''.split("\n")

_CONVERSIONS = '''

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
                yield source.key, torch.stack([slices[k] for k in range(lengths[source.key])])'''.split("\n")
