"""Evaluate spec expressions against an HF config, the spec's symbols and capture values.

Names resolve in this order: capture values, spec symbols (those with parameters are callable), builtins, then
HF config fields. Errors raise `EvalError` carrying the span of the offending sub-expression.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping as AbcMapping
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
BUILTINS = {"min": min, "max": max, "len": len, "int": int, "float": float, "str": str, "bool": bool,
            "sum": sum, "any": any, "all": all}


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
    if name in BUILTINS:
        return BUILTINS[name]
    value = config_value(scope.config, name)
    if value is MISSING:
        raise EvalError(span, f"unknown name '{name}': not a capture, a symbol, or a field of the HF config")
    return value


@dataclass(frozen=True, slots=True)
class _SymbolFunction:
    symbol: ast.SymbolDef
    scope: Scope

    def __call__(self, *args):
        bound = dict(zip(self.symbol.params, args))
        return evaluate(self.symbol.expr, Scope(self.scope.config, self.scope.symbols, tuple(bound.items())))


def _call(expr: ast.CallExpr, scope: Scope):
    func = evaluate(expr.func, scope)
    args = [evaluate(a, scope) for a in expr.args]
    if isinstance(func, _SymbolFunction) and len(args) != len(func.symbol.params):
        raise EvalError(expr.span, f"symbol '{func.symbol.name}' takes {len(func.symbol.params)} argument(s), "
                                   f"got {len(args)}")
    if not callable(func):
        raise EvalError(expr.span, "only symbols with parameters and builtins can be called")
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
