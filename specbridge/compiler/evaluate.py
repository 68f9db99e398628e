"""Evaluate spec expressions against an HF config, the spec's symbols and capture values.

Names resolve in this order: capture values, spec symbols (those with parameters are callable), the spec
language's functions (`FUNCTIONS`), then HF config fields. Errors raise `EvalError` carrying the span of the
offending sub-expression.

`FUNCTIONS` is the one table of the spec language's own functions (name, implementation, arity, argument kinds).
The interpreter and emitted bridge modules call the same implementations; this module imports neither the
expression parser nor the YAML reader, so a bridge may import it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from dataclasses import dataclass

from ..dsl import ast
from ..dsl.diagnostics import Span


class EvalError(Exception):
    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span, self.message = span, message


MISSING = object()
_BINOPS = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
    "%": operator.mod, "**": operator.pow, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge, "in": lambda a, b: a in b,
}
# ---------------------------------------------------------------- the spec language's functions

MAX_TABULATE = 100_000  # the most entries `tabulate(f, n)` builds (per-layer lists are far shorter)

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


def config_value(config, name: str):
    """A field of an HF config object or plain mapping; `MISSING` when absent."""
    if isinstance(config, AbcMapping):
        return config.get(name, MISSING)
    return getattr(config, name, MISSING)


@dataclass(frozen=True, slots=True)
class Scope:
    config: object
    symbols: dict  # name -> ast.SymbolDef
    captures: tuple[tuple[str, object], ...] = ()

    def with_captures(self, **values) -> "Scope":
        return Scope(self.config, self.symbols, tuple({**dict(self.captures), **values}.items()))


def evaluate(expr, scope: Scope):
    match expr:
        case ast.Const(value=value):
            return value
        case ast.Name(id=name, span=span):
            return _lookup(name, span, scope)
        case ast.ListExpr(items=items):
            return [evaluate(i, scope) for i in items]
        case ast.BinOp(op="and", left=left, right=right):
            return evaluate(left, scope) and evaluate(right, scope)
        case ast.BinOp(op="or", left=left, right=right):
            return evaluate(left, scope) or evaluate(right, scope)
        case ast.BinOp(op=op, left=left, right=right, span=span):
            return _apply(op, evaluate(left, scope), evaluate(right, scope), span)
        case ast.UnaryOp(op="not", operand=operand):
            return not evaluate(operand, scope)
        case ast.UnaryOp(op="-", operand=operand):
            return -evaluate(operand, scope)
        case ast.IfElse(cond=cond, then=then, other=other):
            return evaluate(then, scope) if evaluate(cond, scope) else evaluate(other, scope)
        case ast.CallExpr():
            return _call(expr, scope)
        case ast.Subscript(value=value, index=index, span=span):
            return _subscript(evaluate(value, scope), evaluate(index, scope), span)
        case ast.Attribute(value=value, attr=attr, span=span):
            return _attribute(evaluate(value, scope), attr, span)
    raise EvalError(getattr(expr, "span", Span("?", 0, 0)), f"cannot evaluate {type(expr).__name__}")


def _lookup(name: str, span: Span, scope: Scope):
    captures = dict(scope.captures)
    if name in captures:
        return captures[name]
    symbol = scope.symbols.get(name)
    if symbol is not None:
        if symbol.params:
            return _SymbolFunction(symbol, scope)
        return evaluate(symbol.expr, Scope(scope.config, scope.symbols))
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    value = config_value(scope.config, name)
    if value is MISSING:
        raise EvalError(span, f"unknown name '{name}': not a capture, a symbol, or a field of the HF config")
    return value


@dataclass(frozen=True, slots=True)
class _SymbolFunction:
    symbol: ast.SymbolDef
    scope: Scope

    @property
    def arity(self) -> int:
        return len(self.symbol.params)

    def __call__(self, *args):
        bound = dict(zip(self.symbol.params, args))
        return evaluate(self.symbol.expr, Scope(self.scope.config, self.scope.symbols, tuple(bound.items())))


def _call(expr: ast.CallExpr, scope: Scope):
    func = evaluate(expr.func, scope)
    args = [evaluate(a, scope) for a in expr.args]
    if isinstance(func, _SymbolFunction) and len(args) != len(func.symbol.params):
        raise EvalError(expr.span, f"symbol '{func.symbol.name}' takes {len(func.symbol.params)} argument(s), "
                                   f"got {len(args)}")
    if isinstance(func, Function):
        return call_function(func, args, expr.span)
    if not isinstance(func, _SymbolFunction):
        raise EvalError(expr.span, "only the spec language's functions and symbols with parameters can be called")
    try:
        return func(*args)
    except EvalError:
        raise
    except (TypeError, ValueError) as exc:
        raise EvalError(expr.span, f"call failed: {exc}") from None


def _apply(op: str, left, right, span: Span):
    try:
        return _BINOPS[op](left, right)
    except ZeroDivisionError:
        raise EvalError(span, "division by zero") from None
    except TypeError as exc:
        raise EvalError(span, f"cannot apply '{op}' to {type(left).__name__} and {type(right).__name__}: {exc}") from None


def _subscript(value, index, span: Span):
    try:
        return value[index]
    except (IndexError, KeyError, TypeError) as exc:
        raise EvalError(span, f"cannot index {type(value).__name__} with {index!r}: {exc}") from None


def _attribute(value, attr: str, span: Span):
    result = config_value(value, attr)
    if result is MISSING:
        raise EvalError(span, f"'{attr}' is not a field of {type(value).__name__}")
    return result
