"""The op table (`compiler/ops.py`): one row per op, one kernel per row, exactness decided by dtypes, argument
errors refused with spans, and the one dtype conversion that keeps NaN payloads bit for bit."""

from __future__ import annotations

import pytest
import torch

from specbridge.compiler import compile_plan, ir, ops
from specbridge.compiler.check import check
from specbridge.compiler.invert import invert
from specbridge.compiler.resolve import resolve
from specbridge.compiler.validate import validate
from specbridge.dsl.parser import parse_spec
from specbridge.errors import SpecError
from specbridge.runtime.ops import KERNELS, cast, run_export, run_import

SPEC = """\
spec: ops
hf:
  architectures:
    OpsForCausalLM: {prefix: "model."}
mcore:
  model: gpt
  transformer:
    num_layers: num_hidden_layers
rules:
  - hf: "{prefix}layers.{i:layer}.w"
    mcore: "decoder.layers.{i}.w"
    ops: OPS
  - hf: "{prefix}layers.{i:layer}.s"
    mcore: "decoder.layers.{i}.s"
"""
CONFIG = {"architectures": ["OpsForCausalLM"], "num_hidden_layers": 2}


def spec(op: str):
    return validate(parse_spec(SPEC.replace("OPS", op), "ops.yaml"))


def manifests(hf_dtype: str):
    keys = [f"layers.{i}.{n}" for i in range(2) for n in ("w", "s")]
    return (ir.Manifest(ir.HF, "hf", tuple((f"model.{k}", (4,), hf_dtype) for k in keys)),
            ir.Manifest(ir.MCORE, "mcore", tuple((f"decoder.{k}", (4,), "float32") for k in keys)))


def weight_mappings(plan):
    return [m for m in plan.mappings if m.mcore.endswith(".w")]


def test_every_op_has_one_row_and_one_kernel():
    assert set(KERNELS) == {row.name for row in ops.ROWS}
    assert set(ops.BY_NODE) == set(ops.Op.__args__)
    assert set(ops.SPEC_OPS) == {"add", "cast", "scale"}
    for row in ops.ROWS:
        assert row.sharding in ("elementwise", "whole", "layout") and row.written in ("ops", "layout", "hf_layout",
                                                                                        "absent", "derived")


def test_hf_layout_splits_a_fused_hf_tensor_and_its_inverse_joins_it():
    """Phi-3's qkv_proj ([all q; all k; all v]) -> Megatron's per-group QKV, and the derived program back."""
    kv, r, d, h = 2, 3, 4, 5
    hf = ir.Layout(((ir.BRACKET,), ("h",)), (), (("q", kv * r * d), ("k", kv * d), ("v", kv * d)), "hf")
    mcore = ir.Layout((("g", ir.BRACKET), ("h",)), (("g", kv),), (("q", r * d), ("k", d), ("v", d)), "mcore")
    program = (ops.SplitSource(hf), ops.Fuse(mcore))
    inverse = ops.inverse(program, ops.Inversion({}))
    assert inverse == (ops.Split(mcore), ops.SplitSource(hf, join=True)) and ops.exact(program)
    mapping = ir.Mapping(0, None, "qkv", (ir.Source("x", "qkv_proj"),), ir.Shard("axis", "g", 0), program, inverse)
    assert mapping.hf_layout == hf and mapping.layout == mcore
    x = torch.randn(kv * (r + 2) * d, h)
    q, k, v = x.split([kv * r * d, kv * d, kv * d])
    expected = torch.cat([q.view(kv, r * d, h), k.view(kv, d, h), v.view(kv, d, h)], 1).reshape(-1, h)
    fused = run_import(mapping, {"x": x})
    assert torch.equal(fused, expected)
    assert torch.equal(run_export(mapping, fused)["x"], x)


@pytest.mark.parametrize("target, source, exact", [
    ("float32", "bfloat16", True), ("float32", "float16", True), ("float64", "float32", True),
    ("bfloat16", "float32", False), ("float16", "bfloat16", False), ("bfloat16", "float16", False),
    ("int8", "bfloat16", False), ("int32", "int8", True), ("int8", "int32", False), ("float32", "int16", True),
    ("float32", "int32", False), ("uint8", "int8", False), ("int16", "uint8", True), ("float16", "bool", True),
    ("bool", "float32", False), ("bfloat16", "bfloat16", True),
])
def test_represents(target, source, exact):
    assert ops.represents(target, source) is exact


@pytest.mark.parametrize("op, hf_dtype, exact", [
    ("cast(float32)", "bfloat16", True),
    ("cast(float32)", "float64", False),
    ("cast(int8)", "bfloat16", False),
    ("cast(bfloat16)", "float32", False),
    ("cast(bfloat16)", "bfloat16", True),
    ("add(1)", "float32", False),
])
def test_exactness_is_decided_by_the_dtypes(op, hf_dtype, exact):
    plan = compile_plan(spec(op), CONFIG, manifests=manifests(hf_dtype))
    assert {m.exact for m in weight_mappings(plan)} == {exact}
    assert all(m.exact for m in plan.mappings if m.mcore.endswith(".s"))


def test_unknown_source_dtype_assumes_a_checkpoint_float():
    assert {m.exact for m in weight_mappings(compile_plan(spec("cast(float32)"), CONFIG))} == {True}
    assert {m.exact for m in weight_mappings(compile_plan(spec("cast(int8)"), CONFIG))} == {False}
    assert {m.exact for m in weight_mappings(compile_plan(spec("cast(bfloat16)"), CONFIG))} == {False}


@pytest.mark.parametrize("op, message", [
    ("cast(__class__)", "cast takes a dtype name (float64, float32, bfloat16, float16, int64, int32, int16, int8, "
                        "uint8, bool), got '__class__'"),
    ("cast(float128)", "cast takes a dtype name"),
    ("'cast(\"x\" + \"y\")'", "cast takes a dtype name (float64, float32, bfloat16, float16, int64, int32, int16, "
                              "int8, uint8, bool), got an expression"),
    ("scale(0)", "scale takes a quoted tensor pattern, e.g. '{prefix}layers.{i}.scale', got 0"),
    ("'scale(\"a b\")'", "scale takes a tensor pattern (invalid name pattern: unexpected whitespace)"),
    ("'scale(\"{prefix}layers.{i}.s[{e}]\")'", "scale takes a pattern naming one whole tensor"),
    ('add("one")', "add takes a number, got 'one'"),
    ("add(true)", "add takes a number, got True"),
    ("add(1, 2)", "op 'add' takes exactly one argument: add(<number>)"),
    ("add(value=1)", "op 'add' takes a positional argument, not 'value='"),
    ("'scale(of=\"{prefix}x\")'", "op 'scale' takes a positional argument or by=<pattern>, not 'of='"),
    ("negate(1)", "unknown op 'negate' (expected add, cast or scale)"),
])
def test_bad_op_arguments_are_refused_with_a_span(op, message):
    with pytest.raises(SpecError) as info:
        spec(op)
    diagnostics = info.value.diagnostics  # (`cast(__class__)` is also refused as an underscore name)
    assert any(message in d.message for d in diagnostics), [d.message for d in diagnostics]
    assert all((d.span.file, d.span.line) == ("ops.yaml", 12) and d.span.column >= 10 for d in diagnostics)


def test_a_scale_pattern_naming_an_unknown_capture_is_refused_at_the_capture():
    with pytest.raises(SpecError, match=r"ops\.yaml:12:\d+: error: 'j' in scale\(by=\.\.\.\) is not a capture"):
        spec("'scale(\"{prefix}layers.{j}.s\")'")


def test_a_non_finite_add_is_refused_by_resolve_with_a_span():
    with pytest.raises(SpecError, match=r"ops\.yaml:12:\d+: error: add takes a finite number, got inf"):
        resolve(spec("add(1e999)"), CONFIG)


def test_scale_is_inverted_through_the_carried_tensor():
    plan = compile_plan(spec("'scale(\"{prefix}layers.{i}.s\")'"), CONFIG)
    (m0, _) = weight_mappings(plan)
    assert m0.hf_to_mcore == (ir.ScaleBy("model.layers.0.s"),)
    assert m0.mcore_to_hf == (ir.ScaleBy("decoder.layers.0.s", invert=True),)
    x, s = torch.arange(1.0, 5.0), torch.tensor([2.0, 4.0, 8.0, 0.5])
    imported = run_import(m0, {"x": x}, read={"model.layers.0.s": s}.__getitem__)
    assert torch.equal(imported, x * s)
    back = run_export(m0, imported, read={"decoder.layers.0.s": s}.__getitem__)
    assert torch.equal(back["x"], x)


# ---------------------------------------------------------------- NaN payloads

NAN_BITS = {
    torch.bfloat16: (torch.int16, [0x7FC0, 0xFFFF, 0x7F81, 0xFFC1, 0x7FFF, 0x3F80]),
    torch.float16: (torch.int16, [0x7E00, 0xFFFF, 0x7C01, 0xFE01, 0x3C00]),
    torch.float32: (torch.int32, [0x7FC00000, 0xFFFFFFFF, 0x7F800001, 0xFFC00001, 0x3F800000]),
}


def crafted(dtype: torch.dtype) -> torch.Tensor:
    """NaNs of every kind (quiet, signalling, negative, full payload) and one ordinary value, by bit pattern."""
    bits_dtype, bits = NAN_BITS[dtype]
    width = bits_dtype.itemsize * 8
    return torch.tensor([b - (1 << width) if b >> (width - 1) else b for b in bits], dtype=bits_dtype).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits_dtype = NAN_BITS[a.dtype][0]
    return a.dtype == b.dtype and torch.equal(a.view(bits_dtype), b.view(bits_dtype))


@pytest.mark.parametrize("narrow, wide", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                          (torch.float32, torch.float64), (torch.bfloat16, torch.float64)])
def test_cast_keeps_nan_payloads_through_a_wider_dtype(narrow, wide):
    x = crafted(narrow)
    assert not same_bits(x.to(wide).to(narrow), x)  # torch's own conversions canonicalise NaNs
    assert same_bits(cast(cast(x, wide), narrow), x)
    assert torch.isnan(cast(x, wide)[:-1]).all() and cast(x, wide)[-1] == 1.0


def test_cast_to_a_narrower_float_keeps_nan_a_nan():
    x = crafted(torch.float32)
    narrowed = cast(x, torch.bfloat16)
    assert torch.isnan(narrowed[:-1]).all() and narrowed[-1] == 1.0
    assert int(narrowed.view(torch.int16)[2]) & 0x7F  # 0x7F800001: the payload fits in no bfloat16 bit: quiet bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_payloads_survive_import_then_export(dtype):
    """A cast op on import (to a wider dtype) and the cast back to the dtype read on export."""
    plan = invert(resolve(spec("cast(float64)"), CONFIG))
    (m0, _) = weight_mappings(plan)
    x = crafted(dtype)
    imported = run_import(m0, {"x": x})
    assert imported.dtype == torch.float64
    assert same_bits(run_export(m0, imported, hf_dtype=dtype)["x"], x)
