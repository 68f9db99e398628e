"""Building the AST of a spec's other forms (patterns, layouts, calls, symbol heads) from Lark trees.

The grammar (`grammar.lark`) has one start symbol per form; `expressions.parse` is the one entry that parses a
YAML scalar with it and hands the tree to a transformer made of these methods and the expression methods.
"""

from __future__ import annotations

import lark
from lark import Transformer, v_args

from . import ast


@v_args(meta=True)
class FormsToAst(Transformer):
    """One short method per meaning, each binding straight to a frozen AST dataclass (the `_span`/`_tok_span`
    helpers and `text` come from the transformer that completes this one)."""

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

    def when_clause(self, meta, c):
        return _When(c[0])


_SUBTREE = object()  # marks a pattern ending in `.**`


def tag_when(tree: lark.Tree) -> lark.Tree:
    """Wrap the trailing `when` expression of a call so the transformer can tell it from arguments."""
    children = list(tree.children)
    if len(children) >= 2 and not (isinstance(children[-1], lark.Tree)
                                   and children[-1].data in ("kwarg", "posarg")):
        children[-1] = lark.Tree("when_clause", [children[-1]], children[-1].meta
                                 if isinstance(children[-1], lark.Tree) else None)
    return lark.Tree(tree.data, children, tree.meta)


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
