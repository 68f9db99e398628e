"""The `emit` pass: the generated bridge module is golden-tested, and it computes the same plans and the same
tensors as the interpreted compiler and runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from specbridge.compiler import compile_plan, load
from specbridge.compiler.emit import emit_module
from specbridge.compiler.invert import invert
from specbridge.compiler.plan import order
from specbridge.compiler.resolve import resolve
from specbridge.compiler.validate import validate
from specbridge.errors import SpecError, UsageError
from specbridge.dsl.parser import parse_spec
from specbridge.runtime.ops import run_export, run_import
from tests.support import FAMILIES, tiny_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
SPECS = ("llama", "qwen3", "qwen3_moe", "gemma4", "deepseek_v3", "phi3", "gemma3")  # phi3: an HF-side layout
SPEC_OF = {family: "gemma4" if family.startswith("gemma4") else family.split("_tied")[0].split("_unnormed")[0]
           .split("_mixed")[0].split("_q_proj")[0] for family in FAMILIES}


@pytest.fixture
def at_root(monkeypatch):
    """Spec files are named relative to the repository root, so spans and golden files do not depend on it."""
    monkeypatch.chdir(ROOT)


def spec_path(name: str) -> str:
    return f"specbridge/specs/{name}.yaml"


def load_bridge(text: str, tmp_path: Path, name: str = "bridge"):
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    module_spec = importlib.util.spec_from_file_location(f"specbridge_emitted_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SPECS)
def test_golden(name, request, at_root):
    text = emit_module(load(spec_path(name)))
    golden = GOLDEN / f"{name}_bridge.py"
    if request.config.getoption("--update-golden"):
        golden.write_text(text)
    assert golden.exists(), f"missing golden file {golden}: run pytest --update-golden"
    assert text == golden.read_text(), f"{golden.name} differs from the emitted module: run pytest --update-golden"


@pytest.mark.parametrize("name", SPECS)
def test_emitted_module_is_standalone(name, at_root, tmp_path):
    text = emit_module(load(spec_path(name)))
    assert emit_module(load(spec_path(name))) == text
    assert all(len(line) < 120 for line in text.splitlines())
    imports = {line.split()[1] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "functools", "specbridge.runtime.bridge"}
    bridge = load_bridge(text, tmp_path, name)
    assert bridge.TEMPLATES.spec == name and bridge.FILE == spec_path(name)
    assert bridge.TEMPLATES.digest in text.split('"""')[1]
    assert "/work/" not in text and str(ROOT) not in text


def configs_of(spec: str):
    families = [f for f in FAMILIES if SPEC_OF[f] == spec]
    out = [(f, tiny_model(f).config) for f in families]
    out.append((f"{families[0]}+bias", tiny_model(families[0], attention_bias=True).config))
    out.append((f"{families[0]}+dict", tiny_model(families[0]).config.to_dict()))
    return out


def interpret(spec, config, fmt=None):
    """The interpreted passes without `compile_plan`'s cache (its key, the config's dict, cannot tell a config
    object from its `to_dict()`, which lacks attribute aliases such as Qwen3-MoE's `num_experts`)."""
    return order(invert(resolve(spec, config, fmt=fmt)))


@pytest.mark.parametrize("name", SPECS)
def test_plans_equal_interpreted(name, at_root, tmp_path):
    spec = load(spec_path(name))
    bridge = load_bridge(emit_module(spec), tmp_path, name)
    for label, config in configs_of(name):
        try:
            interpreted = interpret(spec, config)
        except SpecError:  # e.g. a dict config lacking a field the config object maps: both must refuse it
            with pytest.raises(SpecError):
                bridge.plan(config)
            continue
        for fmt in spec.formats:
            emitted = bridge.plan(config, fmt=fmt)
            assert emitted == interpret(spec, config, fmt=fmt), f"{name} / {label} / {fmt}"
            if not isinstance(config, dict):
                assert emitted == compile_plan(spec, config, fmt=fmt), f"{name} / {label} / {fmt}"
        assert bridge.plan(config) == interpreted and bridge.plan(config).config == interpreted.config


def test_conversion_bit_identical(at_root, tmp_path):
    spec = load(spec_path("qwen3_moe"))
    bridge = load_bridge(emit_module(spec), tmp_path, "qwen3_moe")
    model = tiny_model("qwen3_moe")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = compile_plan(spec, model.config, fmt="fused")

    def part(source):
        return state[source.key] if source.index is None else state[source.key][source.index]

    mcore = dict(bridge.hf_to_mcore(plan, state.__getitem__))
    assert list(mcore) == [m.mcore for m in plan.mappings]
    for mapping in plan.mappings:
        expected = run_import(mapping, {s.part: part(s) for s in mapping.sources}, read=state.__getitem__)
        assert torch.equal(mcore[mapping.mcore], expected), mapping.mcore
    back = dict(bridge.mcore_to_hf(plan, mcore))
    assert sorted(back) == sorted(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    for mapping in plan.mappings:
        parts = run_export(mapping, mcore[mapping.mcore], read=mcore.__getitem__)
        for source in mapping.sources:
            assert torch.equal(parts[source.part], part(source)), source.key


# A spec exercising what the shipped specs do not: parameterised symbols, per-layer geometry, conditional absent
# parts, ops (add, cast, scale), enum captures, a sub-config, sentinels with computed reasons, builtins.
FEATURES = """\
spec: features
hf:
  architectures:
    FeatCausalLM: {prefix: "model."}
    FeatForConditionalGeneration: {prefix: "model.language_model.", config: text_config}
  formats: [a, b]
mcore:
  model: gpt
  transformer:
    num_layers: num_hidden_layers
    num_moe_experts: num_experts if num_experts > 0 else 0
    heads: -num_attention_heads * 2 + max(1, len(layer_types))
    theta: rope.theta
    neg: not (hidden_size == 64 or false)
    mixed: "[1, 2.5, 'x', True][0] - -1"
  model_args:
    vocab_size: vocab_size
symbols:
  full(i): layer_types[i] == "full_attention"
  kv(i): num_global_kv_heads if full(i) else num_kv_heads
  d(i): 2 * head_dim if full(i) else head_dim
  k_eq_v(i): full(i) and attention_k_eq_v
  pick(f): f(0)
rules:
  - hf: "{prefix}embed.weight"
    mcore: "embedding.word_embeddings.weight"
    shard: vocab
  - hf: "lm_head.weight"
    when: tie
    sentinel: tied("embedding.word_embeddings.weight")
  - mcore: "decoder.layers.{i:layer}.rotary.inv_freq"
    sentinel: derived("recomputed from theta")
  - mcore: "decoder.layers.{i:layer}.self_attention.linear_qkv.weight"
    hf:
      q: "{prefix}layers.{i}.q_proj.weight"
      k: "{prefix}layers.{i}.k_proj.weight"
      v: "{prefix}layers.{i}.v_proj.weight"
    absent: {v: "ABSENT_PROJECTION(copy_of=k) when k_eq_v(i)"}
    layout: "(g [q: num_attention_heads // kv(i) * d(i) | k: d(i) | v: d(i)]) h with g = kv(i)"
    shard: g
  - mcore: "decoder.layers.{i:layer}.extra.{proj:gate|up}.weight"
    hf: "{prefix}layers.{i}.{proj}.weight"
    when: pick(full) or i % 2 == 1
    absent: {x: "ABSENT_PROJECTION(zeros) when i == 99"}
    shard: column
  - mcore: "decoder.layers.{i:layer}.norm.weight"
    hf: "{prefix}layers.{i}.norm.weight"
    ops: ["add(1)", "cast(float32)", "scale(by='{prefix}layers.{i}.scale') when i > 0"]
  - hf: "{prefix}layers.{i:layer}.scale"
    mcore: "decoder.layers.{i}.scale"
  - mcore: "decoder.layers.{i:layer}.experts.{e:expert}.fc1.weight"
    hf: "{prefix}layers.{i}.experts.gate_up[{e}]"
    format: a
    layout: "(two f) h with two = 2.0"
    shard: f
  - mcore: "decoder.layers.{i:layer}.experts.{e:expert}.fc1.weight"
    hf: "{prefix}layers.{i}.experts.{e}.fc1.weight"
    format: b
    shard: row
"""

FEATURE_CONFIG = dict(
    architectures=["FeatCausalLM"], num_hidden_layers=3, num_experts=2, num_attention_heads=4,
    layer_types=["full_attention", "sliding_attention", "full_attention"], rope={"theta": 10000.0}, hidden_size=64,
    vocab_size=32, num_global_kv_heads=1, num_kv_heads=2, head_dim=8, attention_k_eq_v=True, tie=True)


def test_features_spec(tmp_path):
    spec = validate(parse_spec(FEATURES, "features.yaml"))
    text = emit_module(spec)
    assert "import functools" in text
    bridge = load_bridge(text, tmp_path, "features")
    for config in (FEATURE_CONFIG, {**FEATURE_CONFIG, "attention_k_eq_v": False, "tie": False, "num_experts": 0},
                   {"architectures": ["FeatForConditionalGeneration"], "text_config": FEATURE_CONFIG}):
        for fmt in spec.formats:
            assert bridge.plan(config, fmt=fmt) == interpret(spec, config, fmt=fmt)
    emitted = bridge.plan(FEATURE_CONFIG)
    assert any(m.absent_parts == ("v",) for m in emitted.mappings)
    assert any(not m.exact for m in emitted.mappings)
    with pytest.raises(UsageError, match="does not serve"):
        bridge.plan({"architectures": ["Other"]})
    with pytest.raises(UsageError, match="has no HF format 'c'"):
        bridge.plan(FEATURE_CONFIG, fmt="c")


def test_unsupported_config_is_refused_by_both(tmp_path, at_root):
    """A config outside the spec's `requires:` (Llama 3 RoPE scaling from an original context other than the 8192
    megatron-core fixes) is refused, never converted wrongly."""
    path = spec_path("llama")
    config = tiny_model("llama").config
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(SpecError, match=r"llama.yaml:\d+:\d+: error: this HF config is not supported"):
        compile_plan(load(path), config)
    module = load_bridge(emit_module(load(path)), tmp_path)
    with pytest.raises(SpecError, match=r"llama.yaml:\d+:\d+: error: this HF config is not supported by the spec: "
                                        r"the requirement 'not llama3 or rope.original_max_position_embeddings == 8192' is false"):
        module.plan(config)
