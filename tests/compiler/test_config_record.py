"""The config reads an import records (`compiler.config_record`): for every family the plan compiled from the
record alone equals the plan compiled from transformers' config, a read the record lacks is never guessed, and a
record made from another config is not used."""

from __future__ import annotations

import json

import pytest

from specbridge import compiler
from specbridge.api import Converter, portable_config
from specbridge.compiler import config_record
from specbridge.demo import FAMILIES, tiny_config


def _converter(family: str) -> Converter:
    return Converter.from_config(tiny_config(family))


def _record(conv: Converter) -> dict | None:
    source = portable_config(conv.hf_config)
    made = config_record.record(conv.spec, conv.hf_config, conv.plan.architecture, conv.plan.format, conv.plan,
                                source)
    return None if made is None else json.loads(json.dumps(made))  # as a checkpoint's metadata holds it


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_recorded_reads_compile_the_same_plan(family):
    conv = _converter(family)
    made = _record(conv)
    if conv.plan.subtrees:  # the HF side of a subtree is the HF model class's: it needs transformers
        assert made is None
        return
    assert made is not None, family
    view = config_record.recorded(made, portable_config(conv.hf_config))
    assert compiler.compile_uncached(conv.spec, view, conv.plan.architecture, conv.plan.format) == conv.plan
    assert view.to_dict() == json.loads(json.dumps(conv.hf_config.to_dict()))
    assert view.attribute_map == dict(getattr(conv.hf_config, "attribute_map", {}) or {})


def test_a_read_not_recorded_is_refused_not_guessed():
    conv = _converter("gemma4_dense")
    made = _record(conv)
    reads = made["reads"]["config"]
    assert reads["per_layer_config"]["sequence"]["length"] == conv.hf_config.num_hidden_layers
    del reads["hidden_size"]
    view = config_record.recorded(made, portable_config(conv.hf_config))
    with pytest.raises(config_record.NotRecorded):
        compiler.compile_uncached(conv.spec, view, conv.plan.architecture, conv.plan.format)
    layers = view.field("per_layer_config")
    with pytest.raises(IndexError):
        layers[len(layers)]


def test_a_record_of_another_config_or_version_is_not_used():
    conv = _converter("llama")
    made, source = _record(conv), portable_config(conv.hf_config)
    assert config_record.recorded(made, {**source, "hidden_size": 66}) is None
    assert config_record.recorded({**made, "version": 0}, source) is None
    assert config_record.recorded(None, source) is None


@pytest.mark.parametrize("damage", [
    lambda m: m.update(reads=[]),
    lambda m: m["reads"]["config"].update(hidden_size={"eval": "__import__('os')"}),
    lambda m: m["reads"]["config"].update(hidden_size={"sequence": {"length": -1, "items": {}}}),
    lambda m: m["reads"]["config"].update(hidden_size={"sequence": {"length": 2, "items": {"5": {"value": 1}}}}),
    lambda m: m.update(attribute_map={"a": 1}),
    lambda m: m.update(spec_digest=3),
])
def test_a_damaged_record_is_refused(damage):
    conv = _converter("llama")
    made, source = _record(conv), portable_config(conv.hf_config)
    damage(made)
    with pytest.raises(config_record.DamagedRecord):
        config_record.recorded(made, source)


def test_nesting_is_bounded():
    conv = _converter("llama")
    made, source = _record(conv), portable_config(conv.hf_config)
    node = {"value": 1}
    for _ in range(config_record.MAX_NESTING + 2):
        node = {"config": {"x": node}}
    made["reads"]["config"]["deep"] = node
    with pytest.raises(config_record.DamagedRecord, match="deeper"):
        config_record.recorded(made, source)
