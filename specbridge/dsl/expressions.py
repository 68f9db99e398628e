"""Parse the small expressions inside a spec's YAML strings with the Lark grammar (`grammar.lark`).

In: a `Located` YAML scalar and which start symbol to use. Out: an AST node (`dsl.ast`) whose spans point into
the spec file (a caret under the exact characters), or a `Diagnostic` describing the syntax error.
"""

from __future__ import annotations

import functools
from importlib import resources

import lark
from lark import Transformer, v_args

from . import ast
from .diagnostics import Diagnostic
from .yaml_source import Located

START_SYMBOLS = ("pattern", "expr", "layout", "call", "symdef")


@functools.cache
def parser() -> lark.Lark:
    grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", start=list(START_SYMBOLS), propagate_positions=True,
                     maybe_placeholders=False, cache=True)


@v_args(meta=True)
class _ToAst(Transformer):
    """One short method per meaning; each binds straight to a frozen AST dataclass."""

    def __init__(self, source: Located):
        super().__init__()
        self.source = source
        self.text = str(source.value)

    def _span(self, meta):
        if getattr(meta, "empty", True):
            return self.source.span
        return self.source.text_span(meta.line, meta.column, meta.end_pos - meta.start_pos)

    def _tok_span(self, tok):
        return self.source.text_span(tok.line, tok.column, len(tok))

    # expressions
    def ifelse(self, meta, c):
        return ast.IfElse(c[1], c[0], c[2], self._span(meta))

    def or_(self, meta, c):
        return ast.BinOp("or", c[0], c[1], self._span(meta))

    def and_(self, meta, c):
        return ast.BinOp("and", c[0], c[1], self._span(meta))

    def not_(self, meta, c):
        return ast.UnaryOp("not", c[0], self._span(meta))

    def neg(self, meta, c):
        return ast.UnaryOp("-", c[0], self._span(meta))

    def compare(self, meta, c):
        return ast.BinOp(str(c[1]), c[0], c[2], self._span(meta))

    def binop(self, meta, c):
        return ast.BinOp(str(c[1]), c[0], c[2], self._span(meta))

    def pow(self, meta, c):
        return ast.BinOp("**", c[0], c[1], self._span(meta))

    def call_expr(self, meta, c):
        return ast.CallExpr(c[0], tuple(c[1:]), self._span(meta))

    def subscript(self, meta, c):
        return ast.Subscript(c[0], c[1], self._span(meta))

    def attribute(self, meta, c):
        return ast.Attribute(c[0], str(c[1]), self._span(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self._tok_span(c[0]))

    def number(self, meta, c):
        text = str(c[0])
        value = float(text) if any(ch in text for ch in ".eE") else int(text)
        return ast.Const(value, self._tok_span(c[0]))

    def string(self, meta, c):
        return ast.Const(str(c[0])[1:-1], self._tok_span(c[0]))

    def true(self, meta, c):
        return ast.Const(True, self._span(meta))

    def false(self, meta, c):
        return ast.Const(False, self._span(meta))

    def none(self, meta, c):
        return ast.Const(None, self._span(meta))

    def list_expr(self, meta, c):
        return ast.ListExpr(tuple(c), self._span(meta))

    # patterns
    def pattern(self, meta, c):
        subtree = bool(c) and c[-1] is _SUBTREE
        c = c[:-1] if subtree else c
        index = c[-1] if c and isinstance(c[-1], _StackRef) else None
        segments = tuple(c[:-1] if index is not None else c)
        stack = ast.Ref(index.name, index.span) if index is not None else None
        return ast.Pattern(segments, stack, self.text, self._span(meta), subtree)

    def subtree(self, meta, c):
        return _SUBTREE

    def segment(self, meta, c):
        return tuple(c)

    def literal(self, meta, c):
        return ast.Literal(str(c[0]), self._tok_span(c[0]))

    def ref(self, meta, c):
        return ast.Ref(str(c[0]), self._span(meta))

    def capture(self, meta, c):
        return ast.Capture(str(c[0]), c[1], self._span(meta))

    def kind(self, meta, c):
        return tuple(str(t) for t in c)

    def stack_index(self, meta, c):
        return _StackRef(str(c[0]), self._span(meta))

    # layouts
    def layout(self, meta, c):
        dims = tuple(d if isinstance(d, tuple) else (d,) for d in c if not isinstance(d, _Binding))
        bindings = tuple((b.name, b.expr) for b in c if isinstance(b, _Binding))
        return ast.Layout(dims, bindings, self.text, self._span(meta))

    def axis(self, meta, c):
        return ast.Axis(str(c[0]), self._tok_span(c[0]))

    def group(self, meta, c):
        return tuple(c)

    def parts(self, meta, c):
        return ast.Parts(tuple(c), self._span(meta))

    def part(self, meta, c):
        return ast.Part(str(c[0]), c[1] if len(c) > 1 else None, self._span(meta))

    def binding(self, meta, c):
        return _Binding(str(c[0]), c[1])

    # calls
    def call(self, meta, c):
        name, rest = str(c[0]), c[1:]
        when = rest.pop() if rest and isinstance(rest[-1], _When) else None
        args = tuple(a.expr for a in rest if isinstance(a, _PosArg))
        kwargs = tuple((a.name, a.expr) for a in rest if isinstance(a, _KwArg))
        return ast.Call(name, args, kwargs, when.expr if when else None, self._span(meta))

    def kwarg(self, meta, c):
        return _KwArg(str(c[0]), c[1])

    def posarg(self, meta, c):
        return _PosArg(c[0])

    def symdef(self, meta, c):
        return (str(c[0]), tuple(str(t) for t in c[1:]))


_SUBTREE = object()  # marks a pattern ending in `.**`


class _StackRef(ast.Ref):
    __slots__ = ()


class _Binding:
    __slots__ = ("name", "expr")

    def __init__(self, name, expr):
        self.name, self.expr = name, expr


class _KwArg(_Binding):
    __slots__ = ()


class _PosArg:
    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = expr


class _When(_PosArg):
    __slots__ = ()


def parse(source: Located, start: str):
    """Parse one YAML scalar as `start`. Returns an AST node, or a `Diagnostic` on a syntax error."""
    text = str(source.value)
    blank = next((k for k, ch in enumerate(text) if ch.isspace()), None) if start == "pattern" else None
    if blank is not None:  # the grammar ignores whitespace, but `norm weight` must not read as `normweight`
        line = text.count("\n", 0, blank) + 1
        column = blank - (text.rfind("\n", 0, blank) + 1) + 1
        return Diagnostic(source.text_span(line, column, 1), "invalid name pattern: unexpected whitespace")
    try:
        tree = parser().parse(text, start=start)
    except lark.exceptions.UnexpectedInput as exc:
        return Diagnostic(source.text_span(exc.line, exc.column, 1) if exc.line > 0 else source.span,
                          _syntax_message(exc, start, text))
    if start == "call":
        tree = _tag_when(tree)
    return _ToAst(source).transform(tree)


def _tag_when(tree: lark.Tree) -> lark.Tree:
    """Wrap the trailing `when` expression of a call so the transformer can tell it from arguments."""
    children = list(tree.children)
    if len(children) >= 2 and not (isinstance(children[-1], lark.Tree)
                                   and children[-1].data in ("kwarg", "posarg")):
        children[-1] = lark.Tree("when_clause", [children[-1]], children[-1].meta
                                 if isinstance(children[-1], lark.Tree) else None)
    return lark.Tree(tree.data, children, tree.meta)


def _when_clause(self, meta, c):
    return _When(c[0])


_ToAst.when_clause = v_args(meta=True)(_when_clause)

_WHAT = {"pattern": "name pattern", "expr": "expression", "layout": "layout", "call": "call",
         "symdef": "symbol definition"}


def _syntax_message(exc: lark.exceptions.UnexpectedInput, start: str, text: str) -> str:
    what = _WHAT[start]
    if isinstance(exc, lark.exceptions.UnexpectedEOF):
        return f"invalid {what}: unexpected end of text"
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        return f"invalid {what}: unexpected character {text[exc.pos_in_stream]!r}"
    token = getattr(exc, "token", None)
    if token is not None and token.type == "$END":
        return f"invalid {what}: unexpected end of text"
    return f"invalid {what}: unexpected {str(token)!r}" if token is not None else f"invalid {what}"
