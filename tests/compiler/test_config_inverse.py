"""`invert_config`: the config mapping run backwards (what export writes into config.json)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

from specbridge.compiler import compile_plan
from specbridge.compiler.invert import invert_config
from tests.compiler.test_emit import FEATURE_CONFIG, FEATURES
from specbridge.compiler.validate import validate
from specbridge.dsl.parser import parse_spec


def test_invertible_entries_are_written_back_from_the_megatron_config():
    spec = validate(parse_spec(FEATURES, "features.yaml"))
    plan = compile_plan(spec, FEATURE_CONFIG)
    source = copy.deepcopy(FEATURE_CONFIG)
    megatron = SimpleNamespace(num_layers=7, theta=5.0, heads=99, activation_func=print)
    out = invert_config(plan, source, None, megatron)
    assert source == FEATURE_CONFIG  # not modified
    assert out["num_hidden_layers"] == 7  # `num_layers: num_hidden_layers` is invertible
    assert out["rope"] == {"theta": 5.0}  # a dotted path
    assert out["num_attention_heads"] == FEATURE_CONFIG["num_attention_heads"]  # `heads` is an expression: one-way
    assert out["architectures"] == ["FeatCausalLM"]


def test_a_sub_config_receives_the_entries():
    spec = validate(parse_spec(FEATURES, "features.yaml"))
    wrapped = {"architectures": ["FeatForConditionalGeneration"], "text_config": FEATURE_CONFIG}
    plan = compile_plan(spec, wrapped)
    out = invert_config(plan, wrapped, "text_config", SimpleNamespace(num_layers=4))
    assert out["text_config"]["num_hidden_layers"] == 4 and "num_hidden_layers" not in out
    assert out["architectures"] == ["FeatForConditionalGeneration"]


def test_only_scalars_are_written_back():
    """A Megatron config value that is not a plain scalar (an object, a class, a mapping) is never written into
    config.json: the source's value stays."""
    spec = validate(parse_spec(FEATURES, "features.yaml"))
    plan = compile_plan(spec, FEATURE_CONFIG)
    for odd in (SimpleNamespace, {"secret": 1}, SimpleNamespace(x=1), [1, 2]):
        out = invert_config(plan, copy.deepcopy(FEATURE_CONFIG), None, SimpleNamespace(num_layers=odd, theta=odd))
        assert out["num_hidden_layers"] == FEATURE_CONFIG["num_hidden_layers"]
        assert out["rope"] == FEATURE_CONFIG["rope"]
