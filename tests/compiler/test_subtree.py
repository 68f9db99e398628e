"""Subtree rules (`{hf: "a.**", mcore: "b.**"}`): a whole module subtree maps 1:1 both ways. Validate refuses
what a subtree rule cannot mean; the check pass expands it against the HF manifest and proves coverage key by
key; the emitted bridge carries it too."""

from __future__ import annotations

import pytest

from specbridge.compiler import compile_plan, ir
from specbridge.compiler.emit import emit_module
from specbridge.compiler.validate import validate
from specbridge.dsl.parser import parse_spec
from specbridge.errors import SpecError
from tests.compiler.test_emit import load_bridge

SPEC = """\
spec: tower
hf:
  architectures:
    TowerForConditionalGeneration: {prefix: "model.language_model."}
mcore:
  model: gpt
  transformer:
    num_layers: num_hidden_layers
rules:
  - hf: "{prefix}layers.{i:layer}.w"
    mcore: "decoder.layers.{i}.w"
  - hf: "model.vision_tower.**"
    mcore: "vision_tower.**"
"""
CONFIG = {"architectures": ["TowerForConditionalGeneration"], "num_hidden_layers": 2}
TOWER = {"model.vision_tower.patch.weight": (4, 3), "model.vision_tower.blocks.0.attn.q.weight": (3, 3),
         "model.vision_tower.blocks.1.attn.q.weight": (3, 3)}
LAYERS = {"model.language_model.layers.0.w": (2,), "model.language_model.layers.1.w": (2,)}


def spec():
    return validate(parse_spec(SPEC, "tower.yaml"))


def manifests(hf_extra=None, mcore_extra=None, drop_hf=(), drop_mcore=()):
    hf = {**LAYERS, **TOWER, **(hf_extra or {})}
    mcore = {k.replace("model.language_model.", "decoder.").replace("model.vision_tower.", "vision_tower."): v
             for k, v in {**LAYERS, **TOWER}.items()}
    mcore.update(mcore_extra or {})
    hf = {k: v for k, v in hf.items() if k not in drop_hf}
    mcore = {k: v for k, v in mcore.items() if k not in drop_mcore}
    return (ir.Manifest(ir.HF, "the hf model", tuple((k, s, "float32") for k, s in hf.items())),
            ir.Manifest(ir.MCORE, "the mcore model", tuple((k, s, "float32") for k, s in mcore.items())))


def refusal(**changes) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_plan(spec(), CONFIG, manifests=manifests(**changes))
    return info.value


def test_subtree_expands_to_one_identity_mapping_per_hf_key():
    unchecked = compile_plan(spec(), CONFIG)
    assert unchecked.subtrees == (ir.Subtree(1, unchecked.subtrees[0].span, "model.vision_tower.", "vision_tower."),)
    assert len(unchecked.mappings) == 2
    plan = compile_plan(spec(), CONFIG, manifests=manifests())
    assert plan.subtrees == ()
    tower = [m for m in plan.mappings if m.rule == 1]
    assert [(m.sources[0].key, m.mcore) for m in tower] == [
        (k, "vision_tower." + k.removeprefix("model.vision_tower.")) for k in sorted(TOWER)]
    for m in tower:
        assert (m.shard, m.hf_to_mcore, m.mcore_to_hf, m.layer, m.exact) == \
            (ir.Shard("replicated"), (), (), None, True)
    assert plan == ir.expand_subtrees(unchecked, manifests()[0].shapes())
    assert [m.rule for m in plan.mappings] == [1, 1, 1, 0, 0]  # non-layer tensors first, in key order


def test_extra_hf_key_under_the_prefix_is_mapped_and_then_missing_on_the_mcore_side():
    error = refusal(hf_extra={"model.vision_tower.new.bias": (3,)})
    assert "rule names mcore tensor 'vision_tower.new.bias', which the mcore model does not have" in str(error)
    assert "tower.yaml:12:5:" in str(error)  # the subtree rule


def test_extra_mcore_key_under_the_prefix_is_covered_by_no_rule_at_the_subtree():
    error = refusal(mcore_extra={"vision_tower.head.weight": (3,)})
    (diagnostic,) = error.diagnostics
    assert "mcore tensor 'vision_tower.head.weight' of the mcore model is covered by no rule" in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (12, 5)


def test_missing_hf_key_leaves_its_mcore_counterpart_uncovered():
    error = refusal(drop_hf=("model.vision_tower.patch.weight",))
    (diagnostic,) = error.diagnostics
    assert "mcore tensor 'vision_tower.patch.weight'" in diagnostic.message and "covered by no rule" in str(error)
    assert diagnostic.span.line == 12


def test_missing_mcore_key_is_named():
    error = refusal(drop_mcore=("vision_tower.blocks.1.attn.q.weight",))
    assert "rule names mcore tensor 'vision_tower.blocks.1.attn.q.weight', which the mcore model does not have" \
        in str(error)


def test_subtree_matching_nothing_is_refused():
    error = refusal(drop_hf=tuple(TOWER), drop_mcore=tuple("vision_tower." + k.split("tower.")[1] for k in TOWER))
    assert "tower.yaml:12:5: error: subtree 'model.vision_tower.**' matches no hf tensor of the hf model" in str(error)


def test_shape_mismatch_inside_a_subtree():
    error = refusal(mcore_extra={"vision_tower.patch.weight": (3, 4)})
    assert "shape mismatch for 'vision_tower.patch.weight'" in str(error)


@pytest.mark.parametrize("rule, message", [
    ('{hf: "model.vision_tower.**", mcore: "vision_tower.w"}', "this pattern must end in '.**' too"),
    ('{hf: "model.vision_tower.w", mcore: "vision_tower.**"}', "this pattern must end in '.**' too"),
    ('{hf: "model.blocks.{i:layer}.**", mcore: "blocks.{i}.**"}', "a subtree pattern cannot capture ('i')"),
    ('{hf: "model.vision_tower.**", mcore: "vision_tower.**", layout: "a b"}', "cannot have 'layout'"),
    ('{hf: "model.vision_tower.**", mcore: "vision_tower.**", ops: "add(1)"}', "cannot have 'ops'"),
    ('{hf: {x: "model.vision_tower.**"}, mcore: "vision_tower.**", absent: {x: "ABSENT_PROJECTION(zeros)"}}',
     "cannot have 'absent'"),
    ('{hf: "model.vision_tower.**", mcore: "vision_tower.**", shard: column}', "a subtree rule is replicated"),
    ('{hf: "model.vision_tower.**", sentinel: ignored("no")}', "maps one hf pattern to one mcore pattern"),
])
def test_validate_refuses_what_a_subtree_rule_cannot_mean(rule, message):
    text = SPEC.replace('  - hf: "model.vision_tower.**"\n    mcore: "vision_tower.**"\n', f"  - {rule}\n")
    with pytest.raises(SpecError, match=r"tower\.yaml:12:\d+: error: ") as info:
        validate(parse_spec(text, "tower.yaml"))
    assert message in str(info.value)


def test_emitted_bridge_carries_the_subtree(tmp_path):
    bridge = load_bridge(emit_module(spec()), tmp_path, "tower")
    assert bridge.plan(CONFIG) == compile_plan(spec(), CONFIG)
    expanded = bridge.expand_subtrees(bridge.plan(CONFIG), manifests()[0].shapes())
    assert expanded == compile_plan(spec(), CONFIG, manifests=manifests())
