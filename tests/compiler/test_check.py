"""The check pass's refusals, each a spanned diagnostic at the rule it concerns, and the layout kernels fuse and
split on arange tensors (every element lands where the layout says)."""

from __future__ import annotations

import pytest
import torch

from specbridge.compiler import compile_plan, ir
from specbridge.compiler.check import check
from specbridge.compiler.resolve import resolve
from specbridge.compiler.validate import validate
from specbridge.dsl.parser import parse_spec
from specbridge.errors import SpecError
from specbridge.runtime.ops import fuse, run_export, run_import, split

SPEC = """\
spec: tiny
hf:
  architectures:
    TinyForCausalLM: {prefix: "model."}
mcore:
  model: gpt
  transformer:
    num_layers: num_hidden_layers
rules:
  - hf: "{prefix}norm.weight"
    mcore: "decoder.final_layernorm.weight"
  - mcore: "decoder.layers.{i:layer}.self_attention.linear_qkv.weight"
    hf:
      q: "{prefix}layers.{i}.self_attn.q_proj.weight"
      k: "{prefix}layers.{i}.self_attn.k_proj.weight"
      v: "{prefix}layers.{i}.self_attn.v_proj.weight"
    layout: "(g [q: 2*d | k: d | v: d]) h with g = 2, d = 3"
    shard: g
  - hf: "{prefix}layers.{i:layer}.mlp.down_proj.weight"
    mcore: "decoder.layers.{i}.mlp.linear_fc2.weight"
    shard: row
EXTRA"""
CONFIG = {"architectures": ["TinyForCausalLM"], "num_hidden_layers": 2}
QKV_LINE, NORM_LINE, FC2_LINE = 12, 10, 19
HF = {"model.norm.weight": (4,), **{f"model.layers.{i}.self_attn.{p}_proj.weight": ((12,) if p == "q" else (6,)) + (4,)
                                    for i in range(2) for p in "qkv"},
      **{f"model.layers.{i}.mlp.down_proj.weight": (4, 8) for i in range(2)}}
MCORE = {"decoder.final_layernorm.weight": (4,), **{f"decoder.layers.{i}.self_attention.linear_qkv.weight": (24, 4)
                                                   for i in range(2)},
         **{f"decoder.layers.{i}.mlp.linear_fc2.weight": (4, 8) for i in range(2)}}


def spec(extra: str = ""):
    return validate(parse_spec(SPEC.replace("EXTRA", extra), "tiny.yaml"))


def manifests(hf=None, mcore=None):
    return (ir.Manifest(ir.HF, "the hf model", tuple((k, s, "float32") for k, s in (hf or HF).items())),
            ir.Manifest(ir.MCORE, "the mcore model", tuple((k, s, "float32") for k, s in (mcore or MCORE).items())))


def refused(extra: str = "", hf=None, mcore=None, inverted: bool = True) -> list:
    plan = compile_plan(spec(extra), CONFIG) if inverted else resolve(spec(extra), CONFIG)
    source = spec(extra).source
    with pytest.raises(SpecError) as info:
        check(plan, *manifests(hf, mcore), sources={"tiny.yaml": source})
    rendered = info.value.render()
    assert all(d.span.file == "tiny.yaml" and f"tiny.yaml:{d.span.line}:{d.span.column}: error: " in rendered
               for d in info.value.diagnostics)
    return [(d.span.line, d.message) for d in info.value.diagnostics]


def test_the_tiny_spec_checks():
    plan = compile_plan(spec(), CONFIG, manifests=manifests())
    assert len(plan.mappings) == 5


def test_uncovered_names_are_grouped_by_pattern_at_the_nearest_rule():
    hf = {**HF, **{f"model.layers.{i}.self_attn.q_proj.bias": (12,) for i in range(2)}, "model.norm.bias": (4,)}
    assert sorted(refused(hf=hf)) == [
        (NORM_LINE, "hf tensor 'model.norm.bias' of the hf model is covered by no rule (shown at the nearest rule)"),
        (QKV_LINE, "hf tensor 'model.layers.{i}.self_attn.q_proj.bias' x2 of the hf model is covered by no rule "
                   "(shown at the nearest rule)"),
    ]


def test_uncovered_mcore_names_too():
    mcore = {**MCORE, **{f"decoder.layers.{i}.mlp.linear_fc1.weight": (16, 4) for i in range(2)}}
    assert refused(mcore=mcore) == [
        (FC2_LINE, "mcore tensor 'decoder.layers.{i}.mlp.linear_fc1.weight' x2 of the mcore model is covered by no "
                   "rule (shown at the nearest rule)")]


def test_a_name_far_from_every_rule_is_shown_at_the_top():
    assert refused(hf={**HF, "lm_head.weight": (8, 4)}) == [
        (1, "hf tensor 'lm_head.weight' of the hf model is covered by no rule (shown at the nearest rule)")]


def test_claimed_twice_on_the_mcore_side():
    extra = '  - hf: "{prefix}final_norm.weight"\n    mcore: "decoder.final_layernorm.weight"\n    when: true\n'
    hf = {**HF, "model.final_norm.weight": (4,)}
    assert refused(extra, hf=hf) == [(22, "mcore tensor 'decoder.final_layernorm.weight' is claimed twice (also by "
                                          "the rule at tiny.yaml:10:5)")]


def test_claimed_twice_on_the_hf_side():
    extra = '  - hf: "{prefix}norm.weight"\n    mcore: "decoder.extra_norm.weight"\n    when: true\n'
    mcore = {**MCORE, "decoder.extra_norm.weight": (4,)}
    assert refused(extra, mcore=mcore) == [(22, "hf tensor 'model.norm.weight' is claimed twice (also by the rule at "
                                                "tiny.yaml:10:5)")]


def test_a_named_tensor_the_model_does_not_have():
    mcore = {k: v for k, v in MCORE.items() if k != "decoder.final_layernorm.weight"}
    assert refused(mcore=mcore) == [(NORM_LINE, "rule names mcore tensor 'decoder.final_layernorm.weight', which the "
                                                "mcore model does not have")]


def test_shape_mismatch():
    mcore = {**MCORE, "decoder.layers.1.self_attention.linear_qkv.weight": (20, 4)}
    assert refused(mcore=mcore) == [(QKV_LINE, "shape mismatch for 'decoder.layers.1.self_attention.linear_qkv.weight'"
                                               ": the hf side (model.layers.1.self_attn.q_proj.weight[12, 4], "
                                               "model.layers.1.self_attn.k_proj.weight[6, 4], "
                                               "model.layers.1.self_attn.v_proj.weight[6, 4]) gives [24, 4], the "
                                               "Megatron model has [20, 4]")]


def test_parts_that_disagree_with_the_layout():
    hf = {**HF, "model.layers.0.self_attn.k_proj.weight": (5, 4)}
    ((line, message),) = refused(hf=hf)
    assert line == QKV_LINE and "decoder.layers.0.self_attention.linear_qkv.weight: layout" in message


SCALED = ('  - hf: "{prefix}layers.{i:layer}.mlp.up_proj.weight"\n    mcore: "decoder.layers.{i}.mlp.up.weight"\n'
          "    ops: \"scale(by='{prefix}layers.{i}.self_attn.k_proj.weight')\"\n")
SCALED_HF = {**HF, **{f"model.layers.{i}.mlp.up_proj.weight": (6, 4) for i in range(2)}}
SCALED_MCORE = {**MCORE, **{f"decoder.layers.{i}.mlp.up.weight": (6, 4) for i in range(2)}}


def test_an_op_that_cannot_be_inverted():
    """k_proj is fused into QKV: no Megatron tensor holds it alone, so export could not divide by it."""
    problems = refused(SCALED, hf=SCALED_HF, mcore=SCALED_MCORE, inverted=False)
    assert problems == [(22, f"an op of 'decoder.layers.{i}.mlp.up.weight' cannot be inverted: its inverse reads "
                             f"'model.layers.{i}.self_attn.k_proj.weight', which no plain rename rule carries to the "
                             f"Megatron side") for i in range(2)]
    with pytest.raises(SpecError, match=r"tiny\.yaml:22:5: error: an op of 'decoder.layers.0.mlp.up.weight' cannot"):
        compile_plan(spec(SCALED), CONFIG)  # invert refuses it too: export is never derived from it


def test_a_negative_layer_count_is_a_spanned_error():
    with pytest.raises(SpecError, match=r"tiny\.yaml:8:5: error: 'num_layers' must be a non-negative integer, "
                                        r"got -2"):
        compile_plan(spec(), {**CONFIG, "num_hidden_layers": -2})


# ---------------------------------------------------------------- fuse / split, element by element


def qkv_layout(g=2, r=2, d=3) -> ir.Layout:
    return ir.Layout((("g", ir.BRACKET), ("h",)), (("g", g),), (("q", r * d), ("k", d), ("v", d)), "qkv")


def test_fuse_interleaves_query_groups_element_by_element():
    g, r, d, h = 2, 2, 3, 4
    q = torch.arange(g * r * d * h).reshape(g * r * d, h)
    k = 1000 + torch.arange(g * d * h).reshape(g * d, h)
    v = 2000 + torch.arange(g * d * h).reshape(g * d, h)
    fused = fuse(qkv_layout(g, r, d), {"q": q, "k": k, "v": v})
    assert fused.shape == (g * (r * d + 2 * d), h)
    row = 0
    for group in range(g):
        for source, rows in ((q, r * d), (k, d), (v, d)):
            for j in range(rows):
                assert torch.equal(fused[row], source[group * rows + j]), (group, row)
                row += 1
    assert {n: torch.equal(t, {"q": q, "k": k, "v": v}[n]) for n, t in split(qkv_layout(g, r, d), fused).items()} \
        == {"q": True, "k": True, "v": True}


def test_glu_fuse_puts_gate_above_up():
    f, h = 5, 3
    layout = ir.Layout(((ir.BRACKET, "f"), ("h",)), (), (("gate", 1), ("up", 1)), "([gate | up] f) h")
    gate, up = torch.arange(f * h).reshape(f, h), 100 + torch.arange(f * h).reshape(f, h)
    fused = fuse(layout, {"gate": gate, "up": up})
    assert torch.equal(fused[:f], gate) and torch.equal(fused[f:], up)
    parts = split(layout, fused)
    assert torch.equal(parts["gate"], gate) and torch.equal(parts["up"], up)


def test_a_layout_without_parts_is_a_view():
    layout = ir.Layout((("glu", "f"), ("h",)), (("glu", 2),), (), "(glu f) h")
    x = torch.arange(24).reshape(8, 3)
    assert torch.equal(fuse(layout, {"x": x}), x)
    assert torch.equal(split(layout, x)["x"], x)


def test_absent_parts_are_filled_and_checked_element_by_element():
    extra = ('  - mcore: "decoder.layers.{i:layer}.kv.weight"\n    hf:\n      k: "{prefix}layers.{i}.k.weight"\n'
             '      v: "{prefix}layers.{i}.v.weight"\n    absent: {v: "ABSENT_PROJECTION(copy_of=k) when i == 1"}\n'
             '    layout: "([k | v] f) h"\n')
    plan = compile_plan(spec(extra), CONFIG)
    by_layer = {m.layer: m for m in plan.mappings if m.mcore.endswith("kv.weight")}
    k = torch.arange(12.0).reshape(3, 4)
    fused = run_import(by_layer[1], {"k": k})
    assert torch.equal(fused, torch.cat([k, k]))
    assert set(run_export(by_layer[1], fused)) == {"k"}
    from specbridge.errors import ConversionError

    fused[4, 1] += 1
    with pytest.raises(ConversionError, match="must still be a copy of part 'k'"):
        run_export(by_layer[1], fused)
    v = -torch.arange(12.0).reshape(3, 4)
    assert torch.equal(run_import(by_layer[0], {"k": k, "v": v}), torch.cat([k, v]))
