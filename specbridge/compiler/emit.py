"""Pass `emit`: rule templates -> the source text of a standalone, readable Python bridge module.

In: a validated `ast.Spec`, lowered by `lower` (the same templates the interpreter resolves). Out: deterministic
Python source (`specbridge compile SPEC -o FILE`) that prints those templates as data: every config-dependent
`Value` becomes a small function of the config and the captures it reads, symbols become functions
`sym_<name>(cfg, *params)`, the spec language's functions are called through `fn` (the implementations of
`compiler.evaluate.FUNCTIONS`), config fields read with `field` (the evaluator's accessor), arithmetic, negation
and indexing done by the evaluator's bounded `apply`, `negate` and `subscript`. Its `plan()`
runs the compiler's own `resolve`, `invert` and `order` on them, so it equals `compile_plan` by construction,
and raises the same `specbridge.errors` types. The module imports only `specbridge.runtime.bridge` (which loads
no parser and no YAML reader) and, for symbols passed as values, `functools`; it embeds no absolute path.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..dsl import ast
from ..dsl.diagnostics import Span
from . import ir
from .evaluate import FUNCTIONS
from .lower import lower
from .templates import EXPERT, LAYER, Key, Templates, Value

WIDTH = 119
INDENT = "    "
IMPORTS = ("BRACKET", "EXPERT", "LAYER", "Absent", "Architecture", "ConfigTemplate", "Key", "LayoutTemplate",
           "MappingProduct", "OpCall", "Part", "Plan", "Requirement", "Rule", "SentinelProduct", "Shard", "Span",
           "SubtreeProduct", "Templates", "Value", "apply", "expand_subtrees", "field", "fn", "hf_to_mcore", "invert",
           "mcore_to_hf", "negate", "order", "resolve", "subscript")
# names the generated code uses itself: a capture, binding or parameter spelled like one gets a trailing "_"
RESERVED = {*IMPORTS, "cfg", "functools", "FILE", "TEMPLATES", "plan"}


def emit_module(spec: ast.Spec) -> str:
    """The bridge module's source text for `spec` (deterministic: same spec text and file name, same bytes)."""
    return _Emitter(spec).module()


def portable(file: str) -> str:
    """The spec's file name as the bridge records it: relative paths as given; an absolute path inside the
    specbridge package relative to the package's parent (`specbridge/specs/llama.yaml`), any other just its
    name (a bridge never embeds the layout of the machine it was compiled on)."""
    path = Path(file)
    if not path.is_absolute():
        return file
    package = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(package.parent))
    except ValueError:
        return path.name


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
    if isinstance(node, _Keyword):
        return f"{node.name}={_flat(node.value)}"
    inner = ", ".join(_flat(a) for a in node.args)
    if node.tuple_ and len(node.args) == 1:
        inner += ","
    return f"{node.head}({inner})"


def _render(node, indent: str, lead: str = "", trail: str = "") -> list[str]:
    """Lines for `lead + node + trail` at `indent`, wrapped to WIDTH."""
    if isinstance(node, _Keyword):
        return _render(node.value, indent, f"{lead}{node.name}=", trail)
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
_BOUNDED = {"+", "-", "*", "/", "//", "%", "**", "in"}  # through the evaluator's bounded operators (`apply`)


class _Expr:
    """Prints spec expressions as Python. `env` maps capture, binding and parameter names to Python locals;
    other names are symbols (`sym_x(cfg)`), the spec language's functions (`fn.max`: the implementations of
    `compiler.evaluate.FUNCTIONS`), or HF config fields (`field(cfg, "x")`: the evaluator's config accessor)."""

    def __init__(self, symbols: dict[str, ast.SymbolDef]):
        self.symbols = symbols
        self.needs_functools = False

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
            case ast.BinOp(op=op, left=left, right=right) if op in _BOUNDED:
                return f"apply({_q(op)}, {self(left, env)}, {self(right, env)})", _ATOM
            case ast.BinOp(op=op, left=left, right=right):
                prec = _PREC[op]
                left_min = prec + 1 if prec == 5 else prec
                return f"{self.wrap(left, env, left_min)} {op} {self.wrap(right, env, prec + 1)}", prec
            case ast.UnaryOp(op="not", operand=operand):
                return f"not {self.wrap(operand, env, _NOT)}", _NOT
            case ast.UnaryOp(op="-", operand=operand):
                return f"negate({self(operand, env)})", _ATOM
            case ast.IfElse(cond=cond, then=then, other=other):
                return (f"{self.wrap(then, env, _IFELSE + 1)} if {self.wrap(cond, env, _IFELSE + 1)} "
                        f"else {self.wrap(other, env, _IFELSE)}"), _IFELSE
            case ast.CallExpr(func=func, args=args):
                return self.call(func, args, env), _ATOM
            case ast.Subscript(value=value, index=index):
                return f"subscript({self(value, env)}, {self(index, env)})", _ATOM
            case ast.Attribute(value=value, attr=attr):
                return f"field({self(value, env)}, {_q(attr)})", _ATOM
        raise TypeError(f"cannot emit {type(node).__name__}")

    def name(self, name: str, env: dict[str, str]) -> str:
        if name in env:
            return env[name]
        symbol = self.symbols.get(name)
        if symbol is not None:
            if symbol.params:
                self.needs_functools = True
                return f"functools.partial(sym_{name}, cfg)"
            return f"sym_{name}(cfg)"
        if name in FUNCTIONS:
            return f"fn.{name}"
        return f"field(cfg, {_q(name)})"

    def call(self, func, args, env) -> str:
        arg_text = [self(a, env) for a in args]
        if isinstance(func, ast.Name) and func.id not in env and func.id in self.symbols:
            symbol = self.symbols[func.id]
            if symbol.params and len(args) == len(symbol.params):  # (a wrong count is refused when called)
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
        self.templates = lower(spec)
        self.file = portable(spec.file)
        self.expr = _Expr({s.name: s for s in spec.symbols})
        self.lines = spec.source.splitlines()

    def module(self) -> str:
        body = [*self.symbol_functions(), *self.templates_constant(), *_PLAN]
        return "\n".join([*self.header(body), *body]).rstrip("\n") + "\n"

    def header(self, body: list[str]) -> list[str]:
        t, text = self.templates, "\n".join(body)
        used = tuple(name for name in IMPORTS if re.search(rf"\b{name}\b", text))
        return [
            f'"""Bridge for spec {_q(t.spec)}: Hugging Face <-> megatron-core weight mappings, as plain Python.',
            "",
            f"Generated by `specbridge compile` from {self.file} (digest {t.digest}).",
            "Do not edit: change the spec and compile again. `TEMPLATES` is the spec lowered to rule templates;",
            "`plan(hf_config)` resolves them with the compiler's own passes, so it equals `compile_plan` for the same",
            "spec and config; `hf_to_mcore` and `mcore_to_hf` convert tensors by a plan.",
            '"""',
            "",
            "from __future__ import annotations",
            "",
            *(["import functools", ""] if self.expr.needs_functools else []),
            *_render(_Call("from specbridge.runtime.bridge import ", used), ""),
            "",
            f"FILE = {_q(self.file)}",
        ]

    def span(self, span: Span) -> str:
        file = "FILE" if span.file == self.spec.file else _q(portable(span.file))
        return f"Span({file}, {span.line}, {span.column}" + (f", {span.length})" if span.length != 1 else ")")

    def spec_line(self, span: Span) -> str:
        return self.lines[span.line - 1].strip() if 0 < span.line <= len(self.lines) else ""

    # ------------------------------------------------------------ symbols

    def symbol_functions(self) -> list[str]:
        out = []
        for symbol in self.spec.symbols:
            env = {}
            for p in symbol.params:
                env[p] = _local(p, env.values())
            params = ", ".join(["cfg", *env.values()])
            out += ["", "", f"# {self.file}:{symbol.span.line}: {self.spec_line(symbol.span)}",
                    f"def sym_{symbol.name}({params}):", *_render(self.expr(symbol.expr, env), INDENT, lead="return ")]
        return out

    # ------------------------------------------------------------ the templates, printed

    def templates_constant(self) -> list[str]:
        t = self.templates
        lines = ["", "", "TEMPLATES = Templates("]
        for name, value in (("spec", t.spec), ("file", _Raw("FILE")), ("digest", t.digest), ("model", t.model),
                            ("architectures", t.architectures), ("formats", t.formats), ("requires", t.requires),
                            ("config", t.config)):
            lines += _render(self.data(value), INDENT, lead=f"{name}=", trail=",")
        lines.append(f"{INDENT}rules=(")
        for rule in t.rules:
            lines += [f"{INDENT * 2}# rule {rule.index}: {self.file}:{rule.span.line}",
                      *_render(self.data(rule), INDENT * 2, trail=",")]
        return [*lines, f"{INDENT}),", f"{INDENT}span={self.span(t.span)},", ")"]

    def data(self, obj):
        """A template object as a constructor call: required fields positionally, defaulted fields by keyword
        where they differ from the default; `Value`s as functions of (cfg, *names)."""
        match obj:
            case _Raw(text=text):
                return text
            case Value(expr=expr, names=names, span=span):
                env = {}
                for n in names:
                    env[n] = _local(n, env.values())
                head = "lambda " + ", ".join(["cfg", *env.values()]) + ": "
                names_arg = (_flat(_tuple(_q(n) for n in names)),) if names else ()
                return _Call("Value", (head + self.expr(expr, env), self.span(span), *names_arg))
            case Span():
                return self.span(obj)
            case str() if obj == ir.BRACKET:
                return "BRACKET"
            case str() if obj in (LAYER, EXPERT):
                return obj.upper()
            case tuple():
                return _tuple(self.data(item) for item in obj)
            case _ if dataclasses.is_dataclass(obj):
                return self.constructor(obj)
        return _literal(obj)

    def constructor(self, obj) -> _Call:
        args, by_name = [], False
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            default = f.default if f.default is not dataclasses.MISSING else _NO_DEFAULT
            if default is _NO_DEFAULT and not by_name:
                args.append(self.data(value))
            elif value != default:
                by_name = True
                args.append(_Keyword(f.name, self.data(value)))
            else:
                by_name = True
        return _Call(type(obj).__name__, tuple(args))


_NO_DEFAULT = object()


@dataclass(frozen=True, slots=True)
class _Raw:
    text: str


@dataclass(frozen=True, slots=True)
class _Keyword:
    name: str
    value: object


_PLAN = '''

def plan(hf_config, architecture: str | None = None, fmt: str | None = None) -> Plan:
    """The spec compiled for one HF config: resolved, inverted and ordered (a `SpecError` or `UsageError` if it
    cannot be), as `specbridge.compiler.compile_plan` does. Subtree rules stay unexpanded: expand them against the
    checkpoint's keys with `expand_subtrees(plan, keys)`."""
    return order(invert(resolve(TEMPLATES, hf_config, architecture, fmt)))


__all__ = ["TEMPLATES", "expand_subtrees", "hf_to_mcore", "mcore_to_hf", "plan"]'''.split("\n")
