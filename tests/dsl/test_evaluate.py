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
    ("tabulate(sq, 10001)", "integer from 0 to 10000"), ("tabulate(two, 3)", "symbol with one parameter"),
    ("sum(['a'])", "adds numbers only"), ("min([])", "empty list"), ("int('x')", "int() failed"),
    ("str(layer_types)", "must be a number, string"),
])
def test_function_argument_errors(text, message):
    with pytest.raises(EvalError, match=re.escape(message)):
        value(text, sq__i="i * i", two__a__b="a")


# ---------------------------------------------------------------- reading configs: fields only


def hf_configs():
    from transformers import Gemma4Config, Qwen3MoeConfig

    qwen = Qwen3MoeConfig(num_hidden_layers=2, num_experts=6, hidden_size=32)
    text = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, head_dim=8,
                global_head_dim=16, num_key_value_heads=2, num_global_key_value_heads=1, hidden_size=32,
                attention_k_eq_v=True)
    return qwen, Gemma4Config(text_config=text)


def test_config_fields_aliases_sub_configs_and_per_layer_entries():
    qwen, gemma = hf_configs()
    assert value("num_experts", qwen) == 6 and value("num_local_experts", qwen) == 6  # attribute_map alias
    assert value("hidden_size", qwen) == 32 and value("rope_parameters.rope_theta", qwen) > 0
    assert value("text_config.hidden_size", gemma) == 32
    text = gemma.text_config
    assert value("per_layer_config[1].head_dim", text) == 16 and value("per_layer_config[0].head_dim", text) == 8
    assert value("tabulate(kv, 4)", text, kv__i="per_layer_config[i].num_key_value_heads") == [2, 1, 2, 1]
    assert value("len(per_layer_config)", text) == 4


@pytest.mark.parametrize("text, message", [
    ("to_dict", "'to_dict' is not a config field of Qwen3MoeConfig"),          # a method
    ("sub_configs.text_config", "'sub_configs' is not a config field of Gemma4Config"),  # a class attribute
    ("model_type", "'model_type' is not a config field of Qwen3MoeConfig"),  # a class attribute
    ("hidden_size.real", "'real' cannot be read from an int"),
    ("rope_parameters.rope_theta.real", "'real' cannot be read from a float"),
    ("mlp_only_layers.count", "'count' cannot be read from a list"),
    ("max_position_embeddings[0]", "cannot index an int"),
])
def test_only_config_fields_are_read(text, message):
    qwen, gemma = hf_configs()
    config = gemma if text.startswith("sub_configs") else qwen
    with pytest.raises(EvalError, match=re.escape(message)) as info:
        value(text, config)
    assert info.value.span.file == "<t>"


def test_underscore_fields_are_refused_even_past_validation():
    """`validate` refuses them by their form; the accessor refuses them again (emitted bridges call it)."""
    from specbridge.compiler.evaluate import config_field

    qwen, _ = hf_configs()
    with pytest.raises(EvalError, match="names starting with '_'"):
        config_field(qwen, "__class__", Span("b.py", 3, 1))
    with pytest.raises(EvalError, match="names starting with '_'"):
        config_field({"__class__": 1}, "__class__")
    assert config_field(qwen, "num_experts") == 6


def test_a_refused_config_read_is_a_spanned_error():
    """A heterogeneous Gemma 4 config refuses to read a per-layer field globally: a diagnostic, not a crash."""
    _, gemma = hf_configs()
    with pytest.raises(EvalError, match="reading 'head_dim' of Gemma4TextConfig failed: 'head_dim' is a per-layer"):
        value("head_dim", gemma.text_config)


# ---------------------------------------------------------------- bounded: never a hang, MemoryError or RecursionError


def test_recursion_past_validation_is_bounded():
    """`validate` refuses recursive symbols; evaluation of an unvalidated one still ends, with a clear error."""
    with pytest.raises(EvalError, match="nests too deeply"):
        value("f(1)", f__i="f(i)")
    with pytest.raises(EvalError, match="nests too deeply"):
        value("a", a="b + 1", b="a")
    with pytest.raises(EvalError, match="nests too deeply"):
        value("tabulate(g, 2)", g__i="tabulate(g, 2)")


def test_a_long_symbol_chain_is_bounded():
    chain = {f"s{k}": f"s{k + 1} + 1" for k in range(300)}
    chain["s300"] = "0"
    assert value("s250", **chain) == 50
    with pytest.raises(EvalError, match="nests too deeply") as info:
        value("s0", **chain)
    assert info.value.span == expr("s0").span  # reported at the expression evaluated, not deep inside a symbol


def test_exponential_symbol_doubling_runs_out_of_steps():
    defs = {f"d{k}": f"d{k + 1} + d{k + 1}" for k in range(40)}
    defs["d40"] = "1"
    assert value("d30", **defs) == 1024
    with pytest.raises(EvalError, match="takes too long"):
        value("d0", **defs)


@pytest.mark.parametrize("text, message", [
    ("9 ** 9 ** 9", "integer too large"), ("10 ** 10 ** 10", "integer too large"),
    ("'a' * 10 ** 11", "value too large"), ("10 ** 11 * 'a'", "value too large"), ("[1] * 10 ** 9", "value too large"),
    ("[[0] * 1000] * 1001", "value too large"), ("len(tabulate(big, 10000))", "takes too long"),
    ("2.0 ** 100000", "out of range"), ("10 ** 400 / 3", "out of range"), 
    ("int(1e300) * int(1e300) * 2 ** 3000", "too large"),
])
def test_oversized_values_are_refused_before_they_are_built(text, message):
    with pytest.raises(EvalError, match=message):
        value(text, big__i="[i] * 20")


def test_bounds_leave_real_work_alone():
    assert value("len(tabulate(sq, 10000))", sq__i="i * i") == 10000
    assert value("2 ** 4000 > 0") is True
    assert value("len('ab' * 500000)") == 1000000


def test_a_budget_bounds_many_evaluations_together():
    """`resolve` shares one `Budget` between the thousands of expressions it evaluates for a config."""
    from specbridge.compiler.evaluate import Budget

    scope = Scope(CONFIG, symbols(sq__i="i * i"), budget=Budget(900))
    node = expr("len(tabulate(sq, 60))")  # ~250 steps
    assert [evaluate(node, scope.with_captures(i=k)) for k in range(3)] == [60] * 3
    with pytest.raises(EvalError, match="take too long to evaluate for this config"):
        evaluate(node, scope)


def test_the_evaluator_imports_no_parser():
    """Emitted bridges import the function table and the config accessor: no parser, YAML or transformers."""
    import ast as pyast
    from pathlib import Path

    import specbridge.compiler.evaluate as module

    tree = pyast.parse(Path(module.__file__).read_text())
    names = {"." * n.level + (n.module or "") for n in pyast.walk(tree) if isinstance(n, pyast.ImportFrom)}
    names |= {a.name for n in pyast.walk(tree) if isinstance(n, pyast.Import) for a in n.names}
    assert names <= {"__future__", "math", "operator", "sys", "collections.abc", "dataclasses", "..dsl",
                     "..dsl.diagnostics", "..errors"}, names
    assert "lark" not in Path(module.__file__).read_text() and "yaml" not in Path(module.__file__).read_text()
