"""AST -> canonical text, the inverse of `dsl.expressions.parse` up to spans.

In: an expression, `Pattern`, `Layout` or `Call` node. Out: text that parses back (with the matching start symbol)
to an equal AST modulo spans. Expressions are printed fully parenthesised where precedence requires it and
nowhere else; spacing is canonical (`a + b`, `f(x, y)`, `[q: r * d | k: d]`).
"""

from __future__ import annotations

from . import ast

# binding strength of each operator; higher binds tighter (mirrors grammar.lark)
_PREC = {"if": 1, "or": 2, "and": 3, "not": 4, "cmp": 5, "+": 6, "-": 6, "*": 7, "/": 7, "//": 7, "%": 7,
         "neg": 8, "**": 9, "atom": 10}
_COMPARE = {"==", "!=", "<", "<=", ">", ">=", "in"}


def to_text(node) -> str:
    """Canonical text of any AST node the expression parser produces."""
    match node:
        case ast.Pattern():
            return _pattern(node)
        case ast.Layout():
            return _layout(node)
        case ast.Call():
            return _call(node)
        case ast.SymbolDef():
            head = f"{node.name}({', '.join(node.params)})" if node.params else node.name
            return f"{head}: {to_text(node.expr)}"
    return _expr(node)


def _prec(node) -> int:
    match node:
        case ast.IfElse():
            return _PREC["if"]
        case ast.BinOp(op=op):
            return _PREC["cmp"] if op in _COMPARE else _PREC[op]
        case ast.UnaryOp(op="not"):
            return _PREC["not"]
        case ast.UnaryOp(op="-"):
            return _PREC["neg"]
        case ast.Const(value=value) if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            return _PREC["neg"]
    return _PREC["atom"]


def _wrap(node, minimum: int) -> str:
    text = _expr(node)
    return f"({text})" if _prec(node) < minimum else text


def _expr(node) -> str:
    match node:
        case ast.Name(id=name):
            return name
        case ast.Const(value=value):
            return _const(value)
        case ast.ListExpr(items=items):
            return "[" + ", ".join(_expr(i) for i in items) + "]"
        case ast.IfElse(cond=cond, then=then, other=other):
            # then/cond are or_tests; the else branch is a full expression (right-associative)
            return f"{_wrap(then, _PREC['or'])} if {_wrap(cond, _PREC['or'])} else {_wrap(other, _PREC['if'])}"
        case ast.BinOp(op="**", left=left, right=right):
            return f"{_wrap(left, _PREC['atom'])} ** {_wrap(right, _PREC['neg'])}"
        case ast.BinOp(op=op, left=left, right=right):
            prec = _prec(node)
            # comparisons do not chain in the grammar: both sides must be sums
            left_min, right_min = (prec + 1, prec + 1) if op in _COMPARE else (prec, prec + 1)
            return f"{_wrap(left, left_min)} {op} {_wrap(right, right_min)}"
        case ast.UnaryOp(op="not", operand=operand):
            return f"not {_wrap(operand, _PREC['not'])}"
        case ast.UnaryOp(op="-", operand=operand):
            return f"-{_wrap(operand, _PREC['neg'])}"
        case ast.CallExpr(func=func, args=args):
            return f"{_wrap(func, _PREC['atom'])}({', '.join(_expr(a) for a in args)})"
        case ast.Subscript(value=value, index=index):
            return f"{_wrap(value, _PREC['atom'])}[{_expr(index)}]"
        case ast.Attribute(value=ast.Const(value=number) as value, attr=attr) if not isinstance(number, str | bool):
            return f"({_expr(value)}).{attr}"  # `0.e0` would lex as one number
        case ast.Attribute(value=value, attr=attr):
            return f"{_wrap(value, _PREC['atom'])}.{attr}"
    raise TypeError(f"to_text: not an AST node: {node!r}")


def _const(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "\\" in value:
            raise ValueError(f"string {value!r} holds a backslash: the grammar has no escapes")
        if '"' not in value:
            return f'"{value}"'
        if "'" not in value:
            return f"'{value}'"
        raise ValueError(f"string {value!r} holds both quote kinds: the grammar has no escapes")
    if isinstance(value, float):
        text = repr(value)
        if text in ("inf", "nan", "-inf"):
            raise ValueError(f"{value!r} has no literal in the grammar")
        return text
    return str(value)


def _pattern(node: ast.Pattern) -> str:
    text = ".".join("".join(_piece(p) for p in segment) for segment in node.segments)
    if node.subtree:
        return text + ".**"
    return text + (f"[{{{node.stack_index.name}}}]" if node.stack_index is not None else "")


def _piece(piece) -> str:
    match piece:
        case ast.Literal(text=text):
            return text
        case ast.Capture(name=name, kind=kind):
            return f"{{{name}:{'|'.join(kind)}}}"
        case ast.Ref(name=name):
            return f"{{{name}}}"
    raise TypeError(f"to_text: not a pattern piece: {piece!r}")


def _layout(node: ast.Layout) -> str:
    dims = " ".join(_dim(d) for d in node.dims)
    if not node.bindings:
        return dims
    return f"{dims} with " + ", ".join(f"{name} = {_expr(expr)}" for name, expr in node.bindings)


def _dim(factors) -> str:
    if len(factors) == 1:
        return _factor(factors[0])
    return "(" + " ".join(_factor(f) for f in factors) + ")"


def _factor(factor) -> str:
    if isinstance(factor, ast.Axis):
        return factor.name
    return "[" + " | ".join(p.name if p.size is None else f"{p.name}: {_expr(p.size)}" for p in factor.parts) + "]"


def _call(node: ast.Call) -> str:
    args = [_expr(a) for a in node.args] + [f"{k}={_expr(v)}" for k, v in node.kwargs]
    text = f"{node.name}({', '.join(args)})"
    return text + (f" when {_expr(node.when)}" if node.when is not None else "")
