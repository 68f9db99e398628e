"""The spec language's evaluator: its function table, and its refusals (untrusted specs, bounded work)."""

from __future__ import annotations

import re

import pytest

from specbridge.compiler.evaluate import FUNCTIONS, EvalError, Scope, evaluate
from specbridge.dsl.parser import parse_spec
from specbridge.dsl.yaml_source import Located
from specbridge.dsl.diagnostics import Span
from specbridge.dsl.expressions import parse as parse_text

CONFIG = {"hidden_size": 64, "layer_types": ["sliding", "full", "sliding"], "rope": {"theta": 10000.0}}


def expr(text: str):
    node = parse_text(Located(text, Span("<t>", 1, 1), quoted=True), "expr")
    assert not hasattr(node, "message"), node
    return node


def symbols(**defs):
    """Symbols from keyword arguments: `f__i__j="..."` is the symbol `f(i, j)`."""
    def head(key: str) -> str:
        name, *params = key.split("__")
        return f"{name}({', '.join(params)})" if params else name
    body = "\n".join(f"  {head(k)}: {v!r}" for k, v in defs.items())
    spec = parse_spec("spec: t\nhf: {architectures: {T: {prefix: ''}}}\nmcore: {model: gpt}\n"
                      f"symbols:\n{body}\nrules: []\n")
    return {s.name: s for s in spec.symbols}


def value(text: str, config=CONFIG, **defs):
    return evaluate(expr(text), Scope(config, symbols(**defs) if defs else {}))


def test_the_table_lists_the_spec_language_functions():
    assert set(FUNCTIONS) == {"min", "max", "len", "int", "float", "str", "bool", "sum", "any", "all", "tabulate"}
    for function in FUNCTIONS.values():
        assert function.doc and function.arity[0] >= 1 and function.kinds


@pytest.mark.parametrize("text, expected", [
    ("min(3, 1, 2)", 1), ("max([3, 1, 2])", 3), ("len(layer_types)", 3), ("int(2.7)", 2), ("int('12')", 12),
    ("float(1)", 1.0), ("str(hidden_size)", "64"), ("bool([])", False), ("sum([1, 2, 3])", 6),
    ("any([false, true])", True), ("all([true, false])", False), ("min(hidden_size, 32)", 32),
])
def test_functions(text, expected):
    assert value(text) == expected


def test_tabulate_calls_a_one_parameter_symbol():
    assert value("tabulate(full, 3)", full__i='layer_types[i] == "full"') == [False, True, False]
    assert value("tabulate(sq, 0)", sq__i="i * i") == []
    assert value("tabulate(sq, 4)", sq__i="i * i") == [0, 1, 4, 9]


@pytest.mark.parametrize("text, message", [
    ("min()", "takes at least 1 argument"), ("len(1)", "must be a string, list or mapping"),
    ("tabulate(sq, 100001)", "integer from 0 to 100000"), ("tabulate(two, 3)", "symbol with one parameter"),
    ("sum(['a'])", "adds numbers only"), ("min([])", "empty list"), ("int('x')", "int() failed"),
    ("str(layer_types)", "must be a number, string"),
])
def test_function_argument_errors(text, message):
    with pytest.raises(EvalError, match=re.escape(message)):
        value(text, sq__i="i * i", two__a__b="a")
