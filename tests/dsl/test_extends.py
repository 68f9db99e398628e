"""`extends:`: a spec laid over a base spec (a built-in name or a file next to it), merged by the parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from specbridge.compiler import compile_plan
from specbridge.compiler.validate import validate
from specbridge.dsl.parser import load_spec, parse_spec
from specbridge.errors import SpecError

BASE = """\
spec: base
hf:
  architectures:
    BaseForCausalLM: {prefix: "model."}
mcore:
  model: gpt
  transformer:
    num_layers: num_hidden_layers
    hidden_size: hidden_size
    add_bias_linear: false
requires:
  - 'hidden_size > 0'
symbols:
  width: hidden_size
  wide(i): i > 0
rules:
  - hf: "{prefix}embed_tokens.weight"
    mcore: "embedding.word_embeddings.weight"
  - hf: "{prefix}layers.{i}.mlp.down_proj.weight"
    mcore: "decoder.layers.{i:layer}.mlp.linear_fc2.weight"
    when: wide(i)
"""

CHILD = """\
spec: child
extends: base.yaml
hf:
  architectures:
    ChildForCausalLM: {prefix: "model."}
mcore:
  transformer:
    add_bias_linear: true
    qk_layernorm: true
symbols:
  wide(i): i > 1
rules:
  - hf: "{prefix}norm.weight"
    mcore: "decoder.final_layernorm.weight"
"""


def write(directory: Path, **files: str) -> Path:
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


def test_merge_semantics(tmp_path):
    write(tmp_path, base=BASE, child=CHILD)
    spec = validate(load_spec(tmp_path / "child.yaml"))
    assert spec.name == "child" and [a.name for a in spec.architectures] == ["ChildForCausalLM"]
    assert spec.model == "gpt"                                   # inherited
    fields = {f.field: f for f in spec.transformer}
    assert list(fields) == ["num_layers", "hidden_size", "add_bias_linear", "qk_layernorm"]
    assert fields["add_bias_linear"].expr.value is True and fields["add_bias_linear"].span.file.endswith("child.yaml")
    assert fields["num_layers"].span.file.endswith("base.yaml")
    symbols = {s.name: s for s in spec.symbols}
    assert list(symbols) == ["width", "wide"] and symbols["wide"].span.file.endswith("child.yaml")
    assert len(spec.requires) == 1 and spec.requires[0].span.file.endswith("base.yaml")  # inherited when not given
    assert [r.index for r in spec.rules] == [0, 1, 2]
    assert [Path(r.span.file).name for r in spec.rules] == ["base.yaml", "base.yaml", "child.yaml"]
    assert [Path(f).name for f, _ in spec.sources] == ["base.yaml", "child.yaml"]

    plan = compile_plan(spec, {"num_hidden_layers": 3, "hidden_size": 8})
    assert sorted(m.mcore for m in plan.mappings) == [          # the child's wide(i) chose the layers
        "decoder.final_layernorm.weight", "decoder.layers.2.mlp.linear_fc2.weight", "embedding.word_embeddings.weight"]


def test_requirements_add_up(tmp_path):
    write(tmp_path, base=BASE, child=CHILD + "requires:\n  - 'num_hidden_layers < 3'\n")
    spec = validate(load_spec(tmp_path / "child.yaml"))
    assert [Path(r.span.file).name for r in spec.requires] == ["base.yaml", "child.yaml"]
    compile_plan(spec, {"num_hidden_layers": 2, "hidden_size": 8})
    for config, line in (({"num_hidden_layers": 3, "hidden_size": 8}, 16), ({"num_hidden_layers": 2, "hidden_size": 0}, 12)):
        with pytest.raises(SpecError, match="not supported") as info:
            compile_plan(spec, config)
        assert [d.span.line for d in info.value.diagnostics] == [line]


def test_diagnostics_point_at_the_file_that_wrote_the_rule(tmp_path):
    bad_base = BASE.replace('mcore: "decoder.layers.{i:layer}.mlp.linear_fc2.weight"',
                            'mcore: "decoder.layers.{i:layer}.{e:expert}.linear_fc2.weight"')
    write(tmp_path, base=bad_base, child=CHILD)
    with pytest.raises(SpecError) as info:
        validate(load_spec(tmp_path / "child.yaml"))
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.span.file == str(tmp_path / "base.yaml") and diagnostic.span.line == 20
    rendered = info.value.render()
    assert "base.yaml:20:" in rendered and "{e:expert}" in rendered and "^" in rendered


def test_the_digest_covers_the_base(tmp_path):
    config = {"num_hidden_layers": 2, "hidden_size": 8}
    write(tmp_path, base=BASE, child=CHILD)
    first = compile_plan(validate(load_spec(tmp_path / "child.yaml")), config).digest
    write(tmp_path, base=BASE.replace("spec: base", "spec: base  # edited"))
    second = compile_plan(validate(load_spec(tmp_path / "child.yaml")), config).digest
    assert first != second


def test_builtin_base():
    own = CHILD.replace("extends: base.yaml", "extends: llama").split("rules:")[0]
    spec = validate(parse_spec(own, "user.yaml"))
    assert [Path(f).name for f, _ in spec.sources] == ["llama.yaml", "user.yaml"]
    assert any(r.mcore and r.mcore.text == "decoder.layers.{i:layer}.self_attention.linear_qkv.weight"
               for r in spec.rules)


@pytest.mark.parametrize("extends, message", [
    ("nosuchspec", "no built-in spec named 'nosuchspec'"),
    ("missing.yaml", "no spec file"),
    ("../x y", "must name a built-in spec or a .yaml file"),
])
def test_bad_base_names(tmp_path, extends, message):
    write(tmp_path, child=CHILD.replace("extends: base.yaml", f"extends: {extends}"))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "child.yaml")
    (diagnostic,) = info.value.diagnostics                       # nothing else reported: the base is unknown
    assert message in diagnostic.message and diagnostic.span.line == 2


def test_cycles_are_refused(tmp_path):
    write(tmp_path, a=CHILD.replace("spec: child", "spec: a").replace("base.yaml", "b.yaml"),
          b=BASE.replace("spec: base", "spec: b\nextends: a.yaml"))
    with pytest.raises(SpecError, match=r"'extends' makes a cycle: a.yaml -> b.yaml -> a.yaml"):
        load_spec(tmp_path / "a.yaml")
    write(tmp_path, c=BASE.replace("spec: base", "spec: c\nextends: c.yaml"))
    with pytest.raises(SpecError, match="cycle: c.yaml -> c.yaml"):
        load_spec(tmp_path / "c.yaml")


def test_a_partial_base_is_completed_by_the_child(tmp_path):
    partial = "spec: parts\nrules:\n  - hf: \"{prefix}norm.weight\"\n    mcore: \"decoder.final_layernorm.weight\"\n"
    write(tmp_path, parts=partial, whole=BASE.replace("spec: base", "spec: whole\nextends: parts.yaml"))
    spec = validate(load_spec(tmp_path / "whole.yaml"))
    assert len(spec.rules) == 3
    with pytest.raises(SpecError, match="spec is missing 'hf'"):
        load_spec(tmp_path / "parts.yaml")


def test_an_unreadable_base_is_a_spec_error(tmp_path):
    (tmp_path / "base.yaml").write_bytes(b"spec: \xff\xfe\n")
    write(tmp_path, child=CHILD)
    with pytest.raises(SpecError, match="base.yaml:1:7: error: the spec is not UTF-8 text"):
        load_spec(tmp_path / "child.yaml")
    (tmp_path / "base.yaml").unlink()
    (tmp_path / "base.yaml").mkdir()
    with pytest.raises(SpecError, match="no spec file"):
        load_spec(tmp_path / "child.yaml")


def test_a_changed_base_is_read_again(tmp_path):
    """`compiler.load` caches parsed specs; a base edited since is not served from the cache."""
    from specbridge import compiler

    write(tmp_path, base=BASE, child=CHILD)
    before = compiler.load(tmp_path / "child.yaml")
    (tmp_path / "base.yaml").write_text(BASE.replace("'hidden_size > 0'", "'hidden_size > 1'"))
    after = compiler.load(tmp_path / "child.yaml")
    assert after.merged_source != before.merged_source and "hidden_size > 1" in after.merged_source


def test_a_confined_chain_stays_inside(tmp_path):
    """A spec read with `within` (a checkpoint's copy) may extend files inside that directory or built-in specs,
    never a file elsewhere."""
    from specbridge import compiler

    inside = tmp_path / "ckpt"
    inside.mkdir()
    write(tmp_path, base=BASE)
    write(inside, child=CHILD.replace("base.yaml", "../base.yaml"))
    with pytest.raises(SpecError, match="which is outside"):
        compiler.load(inside / "child.yaml", within=inside)
    assert compiler.load(inside / "child.yaml").name == "child"  # the user's own files: no confinement
