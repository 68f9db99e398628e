"""The JSON Schema for spec files (specbridge/specs/spec.schema.json): every built-in spec names it on its first
line and validates against it; it allows exactly the keys the parser allows; it rejects what the parser rejects
structurally."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from specbridge.dsl import parser

SPECS = Path(str(resources.files("specbridge.specs")))
SCHEMA = json.loads((SPECS / "spec.schema.json").read_text())
BUILTIN = sorted(SPECS.glob("*.yaml"))
HEADER = "# yaml-language-server: $schema=spec.schema.json"


def test_the_schema_ships_with_the_specs_and_allows_the_parsers_keys():
    assert BUILTIN and SCHEMA["$schema"].endswith("2020-12/schema")
    props, defs = SCHEMA["properties"], SCHEMA["$defs"]
    assert set(props) == parser.TOP_KEYS
    assert set(props["hf"]["properties"]) == parser.HF_KEYS
    assert set(props["mcore"]["properties"]) == parser.MCORE_KEYS
    assert set(defs["architecture"]["properties"]) == parser.ARCH_KEYS
    assert set(defs["rule"]["properties"]) == parser.RULE_KEYS


@pytest.mark.parametrize("path", BUILTIN, ids=[p.stem for p in BUILTIN])
def test_builtin_spec_names_the_schema(path):
    assert path.read_text().splitlines()[0] == HEADER


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


@pytest.mark.parametrize("path", BUILTIN, ids=[p.stem for p in BUILTIN])
def test_builtin_spec_is_valid(path, validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(
        yaml.safe_load(path.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("change, where", [
    (lambda s: s.update(rulez=[]), ""),
    (lambda s: s["hf"].update(architecture={}), "hf"),
    (lambda s: s["rules"].append({"mcore": "a.b", "shards": "row"}), "rules/"),
    (lambda s: s["rules"].append({"doc": "names neither side"}), "rules/"),
    (lambda s: s["rules"].append({"hf": "a b", "mcore": "x"}), "rules/"),
    (lambda s: s["hf"]["architectures"]["LlamaForCausalLM"].pop("prefix"), "hf/architectures"),
    (lambda s: s["symbols"].update({"f(": "1"}), "symbols"),
    (lambda s: s.pop("rules"), ""),
    (lambda s: s.update(extends="../x y"), "extends"),
])
def test_structural_mistakes_are_rejected(change, where, validator):
    spec = yaml.safe_load((SPECS / "llama.yaml").read_text())
    assert not list(validator.iter_errors(spec))
    change(spec)
    errors = list(validator.iter_errors(spec))
    assert errors and any("/".join(map(str, e.absolute_path)).startswith(where) for e in errors), errors


def test_a_spec_that_extends_another_needs_only_its_name(validator):
    assert not list(validator.iter_errors({"spec": "mine", "extends": "llama"}))
    assert list(validator.iter_errors({"spec": "mine"}))
