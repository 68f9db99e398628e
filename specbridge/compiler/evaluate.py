"""Evaluate spec expressions against an HF config, the spec's symbols and capture values. Specs are untrusted.

Names resolve in this order: capture values, spec symbols (those with parameters are callable), the spec
language's functions (`FUNCTIONS`), then HF config fields. Errors raise `EvalError` carrying the span of the
offending sub-expression.

`FUNCTIONS` is the one table of the spec language's own functions (name, implementation, arity, argument kinds).
The interpreter and emitted bridge modules call the same implementations; this module imports neither the
expression parser nor the YAML reader (nor transformers), so a bridge may import it.

What an expression can reach: literals, captures, symbols, the functions of the table, and fields of configs
(an HF `PretrainedConfig` or a mapping, their sub-configs and the entries of their lists), read only through
`config_value`. No attribute of any other Python object, no name or field starting with `_`, no builtin.
`static_problems` refuses what is wrong by its form alone (validate time: underscore names, calls of anything
but a function or symbol, recursive symbols). Every evaluation is bounded: at most `MAX_STEPS` steps (nodes
visited, list entries built; a `Budget` in the scope bounds many evaluations together), `MAX_DEPTH` levels of
nesting (symbol calls included), integers of `MAX_INT_BITS` bits, strings and lists of `MAX_SIZE` entries and
characters in all; what would exceed a bound is refused before it is computed, as an `EvalError` at the
offending sub-expression.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..dsl import ast
from ..dsl.diagnostics import UNKNOWN_SPAN, Diagnostic, Span
from ..errors import SpecError

MAX_STEPS = 200_000
MAX_TOTAL_STEPS = 2_000_000  # a `Budget`'s default (resolving a real 30-layer, 128-expert model takes ~1,000)
MAX_DEPTH = 200
MAX_INT_BITS = 4096
MAX_SIZE = 1_000_000


class EvalError(SpecError):
    """An expression that cannot be evaluated: one spanned diagnostic. Raised without a span (`UNKNOWN_SPAN`) by
    `config_value`; `at(span)` places it."""

    def __init__(self, span: Span, message: str):
        self.span, self.message = span, message
        super().__init__([Diagnostic(span, message)])

    def at(self, span: Span) -> "EvalError":
        return self if self.span != UNKNOWN_SPAN else EvalError(span, self.message)


MISSING = object()


# ---------------------------------------------------------------- the spec language's functions

MAX_TABULATE = 10_000  # the most entries `tabulate(f, n)` builds (per-layer/per-expert lists are shorter)

# argument kinds: what a function accepts, by name (the last kind of a variadic function repeats)
KINDS: dict[str, Callable[[object], bool]] = {
    "number": lambda v: isinstance(v, int | float),  # bool included, as in Python
    "scalar": lambda v: v is None or isinstance(v, bool | int | float | str),
    "list": lambda v: isinstance(v, list | tuple),
    "sized": lambda v: isinstance(v, str | list | tuple | AbcMapping | Sequence),
    "value": lambda v: True,
    "symbol": lambda v: callable(v) and getattr(v, "arity", 1) == 1,  # a symbol with one parameter
    "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TABULATE,
}
KIND_TEXT = {"number": "a number", "scalar": "a number, string, boolean or null", "list": "a list",
             "sized": "a string, list or mapping", "value": "a value", "symbol": "a symbol with one parameter",
             "count": f"an integer from 0 to {MAX_TABULATE}"}


@dataclass(frozen=True, slots=True)
class Function:
    """One function of the spec language: `implementation(*args)` after the arguments passed `check`."""

    name: str
    implementation: Callable
    arity: tuple[int, int | None]  # fewest and most arguments (None: any number)
    kinds: tuple[str, ...]  # per argument; a variadic function's last kind repeats
    doc: str

    def check(self, args) -> str | None:
        """Why `args` cannot be passed, or None when they can."""
        low, high = self.arity
        if len(args) < low or high is not None and len(args) > high:
            want = f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            return f"function '{self.name}' takes {want} argument(s), got {len(args)}"
        for number, arg in enumerate(args):
            kind = self.kinds[min(number, len(self.kinds) - 1)]
            if not KINDS[kind](arg):
                return (f"argument {number + 1} of '{self.name}' must be {KIND_TEXT[kind]}, "
                        f"got {type(arg).__name__}")
        return None


def _extremum(pick: Callable, name: str):
    def implementation(*args):
        values = list(args[0]) if len(args) == 1 else list(args)
        if len(args) == 1 and not isinstance(args[0], list | tuple):
            raise ValueError(f"{name}() of one argument needs a list")
        if not values:
            raise ValueError(f"{name}() of an empty list")
        return pick(values)
    return implementation


def _sum(values):
    if not all(KINDS["number"](v) for v in values):
        raise ValueError("sum() adds numbers only")
    return sum(values)


def _tabulate(f, n):
    return [f(i) for i in range(n)]


FUNCTIONS: dict[str, Function] = {f.name: f for f in (
    Function("min", _extremum(min, "min"), (1, None), ("value",), "smallest of a list, or of the arguments"),
    Function("max", _extremum(max, "max"), (1, None), ("value",), "largest of a list, or of the arguments"),
    Function("len", len, (1, 1), ("sized",), "number of entries of a list, mapping or string"),
    Function("int", int, (1, 1), ("scalar",), "integer of a number (truncated) or of a decimal string"),
    Function("float", float, (1, 1), ("scalar",), "floating-point value of a number or string"),
    Function("str", str, (1, 1), ("scalar",), "text of a number, string, boolean or null"),
    Function("bool", bool, (1, 1), ("value",), "truth value (empty lists, 0, '' and null are false)"),
    Function("sum", _sum, (1, 1), ("list",), "sum of a list of numbers"),
    Function("any", any, (1, 1), ("list",), "whether some entry of a list is true"),
    Function("all", all, (1, 1), ("list",), "whether every entry of a list is true"),
    Function("tabulate", _tabulate, (2, 2), ("symbol", "count"),
             f"[f(0), ..., f(n-1)] for a symbol f with one parameter (n at most {MAX_TABULATE})"),
)}


def call_function(function: Function, args, span: Span):
    """`function(*args)`, its argument errors raised as `EvalError`s at `span`."""
    problem = function.check(args)
    if problem is not None:
        raise EvalError(span, problem)
    try:
        return function.implementation(*args)
    except EvalError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EvalError(span, f"{function.name}() failed: {exc}") from None


# ---------------------------------------------------------------- reading configs


class ConfigView:
    """A config read without transformers, field by field (`compiler.config_record`): expressions see it as they
    see the `PretrainedConfig` it stands for. `field(name)` is the value, or `MISSING`."""

    def field(self, name: str):
        raise NotImplementedError


def is_hf_config(value) -> bool:
    """Whether `value` is a transformers `PretrainedConfig` or a `ConfigView` of one (without importing
    transformers: no object is one unless transformers is loaded)."""
    if isinstance(value, ConfigView):
        return True
    module = sys.modules.get("transformers.configuration_utils")
    base = getattr(module, "PreTrainedConfig", None) or getattr(module, "PretrainedConfig", None)
    return base is not None and isinstance(value, base)


def is_data(value) -> bool:
    """Values an expression may hold: scalars, lists, mappings and configs; never a class, function or module."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if callable(value) or isinstance(value, bytes | bytearray):
        return False
    return isinstance(value, list | tuple | AbcMapping | Sequence) or is_hf_config(value)


def _class_attribute(cls: type, name: str):
    """`name` as the class (or a base) defines it, looked up without running a descriptor; `MISSING` if none."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return MISSING


def _is_hf_field(config, name: str) -> bool:
    """A field of an HF config: set on the instance, an `attribute_map` alias, or a property of its class (the
    computed fields, e.g. `per_layer_config`); class attributes (`model_type`, `sub_configs`, the parallel plans)
    and methods are not."""
    aliases = _class_attribute(type(config), "attribute_map")
    if name in vars(config) or (isinstance(aliases, dict) and name in aliases):
        return True
    return type(_class_attribute(type(config), name)) is property  # not a classproperty (sub_configs)


def config_value(owner, name: str):
    """Field `name` of a config, or `MISSING` when it has none: the one way expressions (and emitted bridges)
    read Python objects. `owner` is an HF `PretrainedConfig` (attribute aliases such as `attribute_map` apply)
    or a mapping (sub-configs, `rope_parameters`, the entries of `per_layer_config`...). Raises `EvalError`
    (without a span) for a name starting with `_`, an owner that is not a config, a value that is not data."""
    if name.startswith("_"):
        raise EvalError(UNKNOWN_SPAN, f"'{name}' is not a config field: names starting with '_' cannot be read")
    if isinstance(owner, AbcMapping):
        value = owner.get(name, MISSING)
    elif isinstance(owner, ConfigView):
        value = owner.field(name)
    elif is_hf_config(owner):
        if not _is_hf_field(owner, name):
            if _class_attribute(type(owner), name) is MISSING:
                return MISSING
            raise EvalError(UNKNOWN_SPAN, f"'{name}' is not a config field of {type(owner).__name__}")
        try:
            value = getattr(owner, name, MISSING)
        except Exception as exc:  # a property of the user's config refused (e.g. an ambiguous per-layer field)
            raise EvalError(UNKNOWN_SPAN, f"reading '{name}' of {type(owner).__name__} failed: {exc}") from None
    else:
        raise EvalError(UNKNOWN_SPAN, f"'{name}' cannot be read from {_kind(owner)}: only configs and mappings "
                                      f"have fields")
    if value is not MISSING and not is_data(value):
        raise EvalError(UNKNOWN_SPAN, f"'{name}' is not a config field of {type(owner).__name__}")
    return value


def config_field(owner, name: str, span: Span = UNKNOWN_SPAN):
    """`config_value`, with a missing field an `EvalError` at `span` too (what an emitted bridge's reads call)."""
    try:
        value = config_value(owner, name)
    except EvalError as exc:
        raise exc.at(span) from None
    if value is MISSING:
        raise EvalError(span, f"'{name}' is not a field of {type(owner).__name__}")
    return value


def _kind(value) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


# ---------------------------------------------------------------- bounded operators


def size_of(value, limit: int = MAX_SIZE) -> int:
    """Entries of a list, nested lists counted in full, plus the characters of the strings in it (or of a
    string); counting stops soon after `limit`, so the cost is bounded too."""
    if isinstance(value, str):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        total += len(item)
        if total <= limit:
            for entry in item:
                if isinstance(entry, list | tuple):
                    stack.append(entry)
                elif isinstance(entry, str):
                    total += len(entry)
    return total


def bounded(value, span: Span):
    """`value`, or an `EvalError` at `span` when it is larger than a spec value may be."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise EvalError(span, f"integer too large (more than {MAX_INT_BITS} bits)")
    elif isinstance(value, str | list | tuple):
        if size_of(value) > MAX_SIZE:
            raise EvalError(span, f"value too large (more than {MAX_SIZE:,} list entries and characters)")
    elif isinstance(value, complex):
        raise EvalError(span, "the result is not a real number")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int)  # bool included


def _power(left, right):
    if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1 \
            and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
        raise ValueError(f"integer too large (more than {MAX_INT_BITS} bits)")
    result = left ** right
    if isinstance(result, complex):
        raise ValueError("the result is not a real number")
    return result


def _times(left, right):
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and _is_int(count) and size_of(seq) * max(count, 0) > MAX_SIZE:
            raise ValueError(f"value too large (more than {MAX_SIZE:,} list entries and characters)")
    return left * right


def _modulo(left, right):
    if isinstance(left, str):
        raise TypeError("'%' is arithmetic only (no string formatting)")
    return left % right


def _contains(item, container):
    if not isinstance(container, str | list | tuple | AbcMapping | Sequence) or callable(container):
        raise TypeError(f"'in' needs a string, list or mapping on its right, got {_kind(container)}")
    return item in container


OPERATORS: dict[str, Callable] = {
    "+": operator.add, "-": operator.sub, "*": _times, "/": operator.truediv, "//": operator.floordiv,
    "%": _modulo, "**": _power, "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge, "in": _contains,
}


def apply(op: str, left, right, span: Span):
    """`left op right` for a binary operator of the spec language, bounded; errors at `span`."""
    try:
        return bounded(OPERATORS[op](left, right), span)
    except ZeroDivisionError:
        raise EvalError(span, "division by zero") from None
    except OverflowError:
        raise EvalError(span, f"cannot apply '{op}' to {type(left).__name__} and {type(right).__name__}: the "
                              f"result is out of range") from None
    except (TypeError, ValueError) as exc:
        raise EvalError(span, f"cannot apply '{op}' to {type(left).__name__} and {type(right).__name__}: "
                              f"{exc}") from None


def negate(value, span: Span):
    if not isinstance(value, int | float):
        raise EvalError(span, f"cannot negate {_kind(value)}")
    return -value


def subscript(value, index, span: Span):
    """`value[index]`: an entry of a list or string (integer index), or of a mapping (scalar key)."""
    if isinstance(value, AbcMapping):
        if not KINDS["scalar"](index):
            raise EvalError(span, f"a mapping's key is a scalar, got {_kind(index)}")
    elif isinstance(value, str | list | tuple | Sequence) and not callable(value):
        if not isinstance(index, int):
            raise EvalError(span, f"a list is indexed by an integer, got {_kind(index)}")
    else:
        raise EvalError(span, f"cannot index {_kind(value)}: only lists, strings and mappings have entries")
    try:
        result = value[index]
    except Exception as exc:  # out of range, no such key, or a config's list view refused the index
        raise EvalError(span, f"cannot index {type(value).__name__} with {index!r}: {exc}") from None
    if not is_data(result):
        raise EvalError(span, f"entry {index!r} of {type(value).__name__} is not a config value")
    return result


# ---------------------------------------------------------------- evaluation


class Budget:
    """Steps shared by many evaluations (one `resolve` evaluates thousands of expressions: together they are
    bounded too, not only each one)."""

    __slots__ = ("left", "total")

    def __init__(self, steps: int = MAX_TOTAL_STEPS):
        self.left = self.total = steps


@dataclass(frozen=True, slots=True)
class Scope:
    config: object
    symbols: dict  # name -> ast.SymbolDef
    captures: tuple[tuple[str, object], ...] = ()
    budget: Budget | None = field(default=None, compare=False)  # shared by every evaluation in this scope

    def with_captures(self, **values) -> "Scope":
        return Scope(self.config, self.symbols, tuple({**dict(self.captures), **values}.items()), self.budget)


def evaluate(expr, scope: Scope):
    """The value of `expr` in `scope`: data (scalars, lists, mappings, configs), never a function."""
    try:
        value = _Evaluation(scope.budget).value(expr, scope)
    except _OutOfBounds as exc:  # wherever it ran out (maybe deep in a symbol), it is this expression's cost
        raise EvalError(expr.span, exc.message) from None
    except RecursionError:  # the caller's own stack was already deep: the same refusal, never a crash
        raise EvalError(expr.span, _TOO_DEEP) from None
    if isinstance(value, _SymbolFunction | Function):
        raise EvalError(expr.span, f"'{value.name}' is a function: call it")
    return value


_TOO_DEEP = f"evaluation nests too deeply (more than {MAX_DEPTH} levels, symbol calls included)"


class _OutOfBounds(EvalError):
    """The step or depth budget of one evaluation ran out."""


class _Evaluation:
    """One bounded evaluation: its step count and nesting depth."""

    __slots__ = ("steps", "depth", "budget")

    def __init__(self, budget: Budget | None):
        self.steps, self.depth, self.budget = 0, 0, budget

    def charge(self, steps: int, span: Span) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise _OutOfBounds(span, f"evaluation takes too long (more than {MAX_STEPS:,} steps)")
        if self.budget is not None:
            self.budget.left -= steps
            if self.budget.left < 0:
                raise _OutOfBounds(span, f"the spec's expressions take too long to evaluate for this config (more "
                                         f"than {self.budget.total:,} steps in all)")

    def value(self, expr, scope: Scope):
        span = expr.span
        self.charge(1, span)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _OutOfBounds(span, _TOO_DEEP)
            return self._value(expr, scope)
        finally:
            self.depth -= 1

    def _value(self, expr, scope: Scope):
        match expr:
            case ast.Const(value=value, span=span):
                return bounded(value, span)
            case ast.Name(id=name, span=span):
                return self.lookup(name, span, scope)
            case ast.ListExpr(items=items, span=span):
                return self.built([self.value(i, scope) for i in items], span)
            case ast.BinOp(op="and", left=left, right=right):
                return self.value(left, scope) and self.value(right, scope)
            case ast.BinOp(op="or", left=left, right=right):
                return self.value(left, scope) or self.value(right, scope)
            case ast.BinOp(op=op, left=left, right=right, span=span):
                result = apply(op, self.value(left, scope), self.value(right, scope), span)
                return self.built(result, span) if isinstance(result, list) else result
            case ast.UnaryOp(op="not", operand=operand):
                return not self.value(operand, scope)
            case ast.UnaryOp(op="-", operand=operand, span=span):
                return negate(self.value(operand, scope), span)
            case ast.IfElse(cond=cond, then=then, other=other):
                return self.value(then, scope) if self.value(cond, scope) else self.value(other, scope)
            case ast.CallExpr():
                return self.call(expr, scope)
            case ast.Subscript(value=value, index=index, span=span):
                return subscript(self.value(value, scope), self.value(index, scope), span)
            case ast.Attribute(value=value, attr=attr, span=span):
                return self.attribute(self.value(value, scope), attr, span)
        raise EvalError(getattr(expr, "span", UNKNOWN_SPAN), f"cannot evaluate {type(expr).__name__}")

    def built(self, value: list, span: Span) -> list:
        """A list this evaluation made: bounded, its size charged as steps."""
        self.charge(min(size_of(value), MAX_SIZE + 1), span)
        return bounded(value, span)

    def lookup(self, name: str, span: Span, scope: Scope, callee: bool = False):
        for key, value in scope.captures:
            if key == name:
                return value
        symbol = scope.symbols.get(name)
        if symbol is not None:
            if symbol.params:
                return _SymbolFunction(symbol, scope, self)
            return self.value(symbol.expr, Scope(scope.config, scope.symbols))
        if name in FUNCTIONS:
            if not callee:
                raise EvalError(span, f"'{name}' is a function of the spec language: call it, e.g. {name}(...)")
            return FUNCTIONS[name]
        try:
            value = config_value(scope.config, name)
        except EvalError as exc:
            raise exc.at(span) from None
        if value is MISSING:
            raise EvalError(span, f"unknown name '{name}': not a capture, a symbol, or a field of the HF config")
        return bounded(value, span)

    def attribute(self, owner, attr: str, span: Span):
        try:
            value = config_value(owner, attr)
        except EvalError as exc:
            raise exc.at(span) from None
        if value is MISSING:
            raise EvalError(span, f"'{attr}' is not a field of {type(owner).__name__}")
        return bounded(value, span)

    def call(self, expr: ast.CallExpr, scope: Scope):
        if not isinstance(expr.func, ast.Name):
            raise EvalError(expr.span, _CALLABLE)
        func = self.lookup(expr.func.id, expr.func.span, scope, callee=True)
        args = [self.value(a, scope) for a in expr.args]
        if isinstance(func, Function):
            self.depth += 1  # a call costs Python frames of its own (tabulate calls symbols in turn)
            try:
                result = call_function(func, args, expr.span)
            finally:
                self.depth -= 1
            return self.built(result, expr.span) if isinstance(result, list) else bounded(result, expr.span)
        if not isinstance(func, _SymbolFunction):
            raise EvalError(expr.span, _CALLABLE)
        if len(args) != len(func.symbol.params):
            raise EvalError(expr.span, f"symbol '{func.symbol.name}' takes {len(func.symbol.params)} argument(s), "
                                       f"got {len(args)}")
        return func(*args)


_CALLABLE = "only the spec language's functions and symbols with parameters can be called"


@dataclass(frozen=True, slots=True)
class _SymbolFunction:
    """A symbol with parameters, as a value (`tabulate(f, n)`, or `f` before its call)."""

    symbol: ast.SymbolDef
    scope: Scope
    evaluation: _Evaluation = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.symbol.name

    @property
    def arity(self) -> int:
        return len(self.symbol.params)

    def __call__(self, *args):
        bound = tuple(zip(self.symbol.params, args))
        evaluation = self.evaluation
        evaluation.depth += 1  # the call's own Python frames
        try:
            return evaluation.value(self.symbol.expr, Scope(self.scope.config, self.scope.symbols, bound))
        finally:
            evaluation.depth -= 1


# ---------------------------------------------------------------- what is wrong by its form alone


def static_problems(spec: ast.Spec) -> Iterator[tuple[Span, str]]:
    """(span, message) for every use of the expression language that no config can make right: a name or field
    starting with `_`, a call of anything but a function or a symbol (or a parameter), a symbol named like a
    function, a symbol that refers to itself (directly or through others: evaluation would never end)."""
    symbols = {s.name: s for s in spec.symbols}
    for symbol in spec.symbols:
        if symbol.name in FUNCTIONS:
            yield symbol.span, f"symbol '{symbol.name}' has the name of a function of the spec language"
        yield from _form_problems(symbol.expr, {*FUNCTIONS, *symbols, *symbol.params})
    for expr in _spec_expressions(spec):
        yield from _form_problems(expr, {*FUNCTIONS, *symbols})
    yield from _cycles(spec.symbols)


def _spec_expressions(spec: ast.Spec) -> Iterator:
    for f in (*spec.transformer, *spec.model_args):
        yield f.expr
    yield from spec.requires
    for rule in spec.rules:
        if rule.when is not None:
            yield rule.when
        if rule.layout is not None:
            yield from (e for _, e in rule.layout.bindings)
            yield from (p.size for d in rule.layout.dims for f in d if isinstance(f, ast.Parts)
                        for p in f.parts if p.size is not None)
        calls = [*(c for _, c in rule.absent), *rule.ops, *([rule.sentinel] if rule.sentinel else [])]
        for call in calls:
            yield from call.args
            yield from (e for _, e in call.kwargs)
            if call.when is not None:
                yield call.when


def _children(expr) -> tuple:
    match expr:
        case ast.ListExpr(items=items):
            return items
        case ast.BinOp(left=left, right=right):
            return left, right
        case ast.UnaryOp(operand=operand):
            return (operand,)
        case ast.IfElse(cond=cond, then=then, other=other):
            return cond, then, other
        case ast.CallExpr(func=func, args=args):
            return (func, *args)
        case ast.Subscript(value=value, index=index):
            return value, index
        case ast.Attribute(value=value):
            return (value,)
    return ()


def _walk(expr) -> Iterator:
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(_children(node))


def _form_problems(expr, callables: set[str]) -> Iterator[tuple[Span, str]]:
    for node in _walk(expr):
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            yield node.span, f"names starting with '_' are not allowed ('{node.id}')"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            yield _attr_span(node), f"fields starting with '_' are not allowed ('{node.attr}'): only config " \
                                    f"fields can be read"
        elif isinstance(node, ast.CallExpr):
            if not isinstance(node.func, ast.Name):
                yield (_attr_span(node.func) if isinstance(node.func, ast.Attribute) else node.func.span), _CALLABLE
            elif node.func.id not in callables and not node.func.id.startswith("_"):
                yield node.func.span, (f"unknown function '{node.func.id}' (the spec language's functions: "
                                       f"{', '.join(FUNCTIONS)}; or a symbol with parameters)")


def _attr_span(node: ast.Attribute) -> Span:
    """The span of the field name of `x.name` (the node's span ends with it)."""
    span, width = node.span, len(node.attr)
    return span.shifted(span.length - width, width) if span.length > width else span


def _cycles(symbols) -> Iterator[tuple[Span, str]]:
    """One diagnostic per symbol on a reference cycle, naming the cycle."""
    by_name = {s.name: s for s in symbols}
    refs = {s.name: sorted({n.id for n in _walk(s.expr) if isinstance(n, ast.Name) and n.id in by_name
                            and n.id not in s.params}) for s in symbols}
    reported: set[str] = set()
    for start in by_name:
        path = _cycle_from(start, refs)
        if path and start not in reported:
            reported.update(path[:-1])
            yield by_name[start].span, (f"symbol '{start}' refers to itself ({' -> '.join(path)}): the spec "
                                        f"language has no recursion")


def _cycle_from(start: str, refs: dict[str, list[str]]) -> list[str] | None:
    """A reference path from `start` back to `start`, or None (iterative depth-first search)."""
    stack, seen = [(start, [start])], set()
    while stack:
        name, path = stack.pop()
        for nxt in refs[name]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None
