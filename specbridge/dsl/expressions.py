"""Parse the small texts inside a spec's YAML strings with the Lark grammar (`grammar.lark`), and build the AST
of expressions (the AST of the other forms, patterns, layouts, calls and symbol heads, is built in `forms.py`).

In: a `Located` YAML scalar and which start symbol to use. Out: an AST node (`dsl.ast`) whose spans point into
the spec file (a caret under the exact characters), or a `Diagnostic` describing the syntax error.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import lark
from lark import v_args

from . import ast
from .diagnostics import Diagnostic
from .forms import FormsToAst, tag_when
from .yaml_source import Located

START_SYMBOLS = ("pattern", "expr", "layout", "call", "symdef")
MAX_NESTING = 64  # levels of one expression (the AST is walked recursively; real specs nest a few levels)
MAX_NUMBER_DIGITS = 40


@functools.cache
def parser() -> lark.Lark:
    grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", start=list(START_SYMBOLS), propagate_positions=True,
                     maybe_placeholders=False, cache=table_cache())


def table_cache() -> str | bool:
    """Where Lark keeps the grammar's parse tables between processes (building them takes ~0.1 s): a file in a
    directory of this user's that no one else can write, or no cache. Lark unpickles the file, and its own default,
    a predictable name in the shared temp directory, would run a pickle anyone could have put there."""
    directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specbridge"
    try:
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        status = directory.lstat()
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        return False
    mine = not hasattr(os, "getuid") or status.st_uid == os.getuid()
    if not mine or status.st_mode & 0o022 or not directory.is_dir() or directory.is_symlink():
        return False
    return str(directory / f"lark-{lark.__version__}-tables.pickle")  # Lark checks the grammar's digest inside


@v_args(meta=True)
class _ToAst(FormsToAst):
    """One short method per meaning; each binds straight to a frozen AST dataclass (expressions here, the other
    forms in `forms.FormsToAst`)."""

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
    refused = _too_large(tree)
    if refused is not None:
        where, message = refused
        return Diagnostic(source.text_span(where.line, where.column, 1), message)
    if start == "call":
        tree = tag_when(tree)
    return _ToAst(source).transform(tree)


def _too_large(tree: lark.Tree):
    """(token or tree meta, message) when the text nests deeper than `MAX_NESTING` or writes a number of more
    than `MAX_NUMBER_DIGITS` digits; None otherwise (an iterative walk: no recursion on untrusted depth)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return node.meta, f"expression nests too deeply (more than {MAX_NESTING} levels)"
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1))
            elif isinstance(child, lark.Token) and child.type == "NUMBER" and len(child) > MAX_NUMBER_DIGITS:
                return child, f"number too long (more than {MAX_NUMBER_DIGITS} characters)"
    return None


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
