"""Property tests of the expression grammar.

(a) Any text, fed to any start symbol, yields an AST node or a `Diagnostic` inside the scalar: never an exception.
(b) Generated valid expressions, patterns, layouts and calls parse, and `printer.to_text` then parse again gives
    an equal AST modulo spans (print -> parse is the identity).
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specbridge.dsl import ast
from specbridge.dsl.diagnostics import Diagnostic, Span
from specbridge.dsl.expressions import START_SYMBOLS, parse
from specbridge.dsl.printer import to_text
from specbridge.dsl.yaml_source import Located

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYWORDS = {"and", "or", "not", "if", "else", "in", "with", "when", "true", "false", "True", "False"}
SCALAR = Span("fuzz.yaml", 7, 12, 1)


def located(text: str, quoted: bool = False) -> Located:
    return Located(text, Span(SCALAR.file, SCALAR.line, SCALAR.column, max(1, len(text))), quoted=quoted)


def strip_spans(node):
    """The node with every span replaced by one constant, recursively (tuples and dataclasses)."""
    if isinstance(node, Span):
        return SCALAR
    if isinstance(node, tuple):
        return tuple(strip_spans(n) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields = {f.name: strip_spans(getattr(node, f.name)) for f in dataclasses.fields(node)}
        if isinstance(node, ast.Pattern | ast.Layout):
            fields["text"] = ""
        return type(node)(**fields)
    return node


# ---------------------------------------------------------------- (a) robustness

ALPHABET = st.sampled_from(list("abgikqvxyz_019 .,:|[](){}=<>!+-*/%\"'\t\n") + ["and ", " or ", "not ", " if ",
                                                                              " else ", " with ", " when ", "**"])


@SETTINGS
@given(st.lists(ALPHABET, max_size=30).map("".join) | st.text(max_size=30), st.sampled_from(START_SYMBOLS),
       st.booleans())
def test_random_text_never_raises(text, start, quoted):
    source = located(text, quoted)
    result = parse(source, start)
    if isinstance(result, Diagnostic):
        span = result.span
        last_line = SCALAR.line + text.count("\n")
        assert span.file == SCALAR.file
        assert SCALAR.line <= span.line <= last_line
        if span.line == SCALAR.line:
            first = SCALAR.column + (1 if quoted else 0)
            assert first <= span.column <= first + len(text.split("\n")[0]) + 1
        assert result.message.startswith("invalid ")
    else:
        assert dataclasses.is_dataclass(result) or isinstance(result, tuple)


# ---------------------------------------------------------------- (b) print -> parse identity

names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in KEYWORDS)
words = st.from_regex(r"[A-Za-z0-9_\-]{1,8}", fullmatch=True)
strings = st.text(st.characters(codec="ascii", exclude_characters="\"'\\\n\r"), max_size=6)
numbers = st.integers(0, 10**6) | st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


def leaf():
    return st.one_of(names.map(lambda n: ast.Name(n, SCALAR)),
                     numbers.map(lambda v: ast.Const(v, SCALAR)),
                     strings.map(lambda v: ast.Const(v, SCALAR)),
                     st.booleans().map(lambda v: ast.Const(v, SCALAR)))


def extend(children):
    ops = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "==", "!=", "<", "<=", ">", ">=", "in", "and", "or"])
    return st.one_of(
        st.builds(lambda op, a, b: ast.BinOp(op, a, b, SCALAR), ops, children, children),
        st.builds(lambda op, a: ast.UnaryOp(op, a, SCALAR), st.sampled_from(["not", "-"]), children),
        st.builds(lambda c, t, o: ast.IfElse(c, t, o, SCALAR), children, children, children),
        st.builds(lambda f, args: ast.CallExpr(f, tuple(args), SCALAR), children, st.lists(children, max_size=3)),
        st.builds(lambda v, i: ast.Subscript(v, i, SCALAR), children, children),
        st.builds(lambda v, a: ast.Attribute(v, a, SCALAR), children, names),
        st.lists(children, max_size=3).map(lambda items: ast.ListExpr(tuple(items), SCALAR)),
    )


exprs = st.recursive(leaf(), extend, max_leaves=12)


def roundtrip(node, start: str):
    text = to_text(node)
    parsed = parse(located(text), start)
    assert not isinstance(parsed, Diagnostic), f"{text!r}: {parsed.message}"
    assert strip_spans(parsed) == strip_spans(node), text
    assert to_text(parsed) == text
    return parsed


@SETTINGS
@given(exprs)
def test_expression_print_parse_identity(node):
    roundtrip(node, "expr")


def pieces():
    kinds = st.sampled_from([("layer",), ("expert",)]) | st.lists(words, min_size=2, max_size=3).map(tuple)
    return st.one_of(words.map(lambda w: ast.Literal(w, SCALAR)),
                     names.map(lambda n: ast.Ref(n, SCALAR)),
                     st.builds(lambda n, k: ast.Capture(n, k, SCALAR), names, kinds))


def _merge_literals(segment):
    """Adjacent literals lex as one WORD: merge them the way the parser will."""
    out = []
    for piece in segment:
        if out and isinstance(piece, ast.Literal) and isinstance(out[-1], ast.Literal):
            out[-1] = ast.Literal(out[-1].text + piece.text, SCALAR)
        else:
            out.append(piece)
    return tuple(out)


patterns = st.builds(
    lambda segs, index: ast.Pattern(tuple(_merge_literals(s) for s in segs),
                                    None if index is None else ast.Ref(index, SCALAR), "", SCALAR),
    st.lists(st.lists(pieces(), min_size=1, max_size=3), min_size=1, max_size=5),
    st.none() | names)


@SETTINGS
@given(patterns)
def test_pattern_print_parse_identity(node):
    roundtrip(node, "pattern")


parts = st.lists(st.builds(lambda n, size: ast.Part(n, size, SCALAR), names, st.none() | exprs),
                 min_size=1, max_size=3).map(lambda ps: ast.Parts(tuple(ps), SCALAR))
axes = names.map(lambda n: ast.Axis(n, SCALAR))
dims = st.lists(axes | parts, min_size=1, max_size=3).map(tuple)
layouts = st.builds(lambda ds, bs: ast.Layout(tuple(ds), tuple(bs), "", SCALAR),
                    st.lists(dims, min_size=1, max_size=3), st.lists(st.tuples(names, exprs), max_size=3))


@SETTINGS
@given(layouts)
def test_layout_print_parse_identity(node):
    roundtrip(node, "layout")


calls = st.builds(lambda n, args, kwargs, when: ast.Call(n, tuple(args), tuple(kwargs), when, SCALAR),
                  names | st.just("ABSENT_PROJECTION"), st.lists(exprs, max_size=2),
                  st.lists(st.tuples(names, exprs), max_size=2), st.none() | exprs)


@SETTINGS
@given(calls)
def test_call_print_parse_identity(node):
    roundtrip(node, "call")


SHIPPED = [
    ("layout", "(g [q: r*d | k: d | v: d]) h with g = kv"),
    ("layout", "([gate | up] f) h"),
    ("layout", "(glu f) h with glu = 2"),
    ("expr", "num_global_key_value_heads if full(i) else num_key_value_heads"),
    ("expr", 'layer_types[i] == "full_attention" and attention_k_eq_v'),
    ("expr", "not tie_word_embeddings"),
    ("expr", "rope_parameters.rope_theta"),
    ("expr", "-a ** -b ** 2 - (c - d) - e"),
    ("expr", "(a if b else c) if (d or e) else f if g else h"),
    ("call", "ABSENT_PROJECTION(copy_of=k) when k_eq_v(i)"),
    ("call", "scale(by='{prefix}layers.{i}.norm.weight')"),
    ("pattern", "{prefix}layers.{i}.mlp.experts.gate_up_proj[{e}]"),
    ("pattern", "decoder.layers.{i:layer}.mlp.experts.local_experts.{e:expert}.linear_fc1.weight"),
]


def test_shipped_forms_print_canonically():
    for start, text in SHIPPED:
        node = parse(located(text), start)
        assert not isinstance(node, Diagnostic), (text, node)
        again = parse(located(to_text(node)), start)
        assert strip_spans(again) == strip_spans(node), (text, to_text(node))


def test_power_binds_tighter_than_unary_minus():
    node = parse(located("-2 ** 2"), "expr")
    assert isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.BinOp) and node.operand.op == "**"
    assert to_text(node) == "-2 ** 2"
