"""LoRA adapters both ways on tiny llama, Qwen3-MoE and Gemma 4 26B-A4B-style (K=V) models with random non-zero
adapters: the derived adapter plan is proved against PEFT's and the Megatron LoRA model's adapter tensors; HF base
+ PEFT adapter logits equal the Megatron model + adapter logits (fp32); PEFT loads the export with no missing or
unexpected keys; the merged export equals PEFT's `merge_and_unload()` (bit for bit or within 1 ulp); the adapter
round trips Megatron -> PEFT -> Megatron bit for bit (and PEFT -> Megatron -> PEFT, through the exact stacking of
differing q/k/v A matrices); the V rows of a K=V layer are checked on export."""

from __future__ import annotations

import json

import pytest
import torch

from specbridge import cli
from specbridge.api import Converter
from specbridge.compiler.adapters import explain
from specbridge.errors import ConversionError, UsageError
from specbridge.runtime.lora import LoraSettings, adapter_tensors
from specbridge.runtime.safetensors_io import CheckpointReader
from specbridge.verify import megatron_logits
from tests.support import save_tiny

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
HF_TARGETS = {"llama": ATTENTION + ["gate_proj", "up_proj", "down_proj"],
              "qwen3_moe": ATTENTION,  # its MLP is routed experts only, which LoRA here does not adapt
              "gemma4_moe": ATTENTION + ["gate_proj", "up_proj", "down_proj"],  # the dense MLP beside the experts
              "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}  # B split by the hf_layout, then fused
FAMILIES = tuple(HF_TARGETS)
RANK, ALPHA = 4, 8


def peft_adapter(hf_dir, out, targets, seed: int = 0):
    """get_peft_model on the HF model, lora_B re-randomised (PEFT starts it at zero); saved to `out`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(out))
    return out


def peft_model(hf_dir, adapter_dir):
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.eval()


def ids_for(conv):
    vocab = conv.plan.model_kwargs()["vocab_size"]
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0)), vocab


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for family in FAMILIES:
        hf = save_tiny(family, root / family / "hf")
        out[family] = (hf, peft_adapter(hf, root / family / "peft", HF_TARGETS[family]), root / family)
    return out


def imported(hf, adapter=None):
    conv = Converter.from_pretrained(hf)
    chunks = conv.build_model()
    conv.import_weights(chunks, hf)
    settings = conv.import_adapter(chunks, adapter) if adapter is not None else None
    return conv, chunks, settings


def randomise(conv, chunks, seed: int = 1):
    """Random non-zero Megatron adapters (A and B), V rows of K=V layers tied to K's, as training leaves them."""
    gen = torch.Generator().manual_seed(seed)
    tensors = adapter_tensors(chunks)
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
        for t in conv.adapter_plan.targets:
            if t.absent_parts:
                _tie_absent_rows(t, tensors[t.b.mcore])


def _tie_absent_rows(t, b):
    from specbridge.runtime.ops import fuse, split

    parts = split(t.b.layout, b)
    for op in t.b.hf_to_mcore:
        if getattr(op, "policy", None) == "copy_of":
            parts[op.part] = parts[op.source_part].clone()
    b.copy_(fuse(t.b.layout, parts))


def within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a.view(torch.int32).long() - b.view(torch.int32).long()).abs() <= 1).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_plan_proved_and_explained(family, models, parallel):
    hf, _, _ = models[family]
    conv = Converter.from_pretrained(hf)
    chunks = conv.build_model()
    conv.add_adapter(chunks, RANK, ALPHA)
    plan = conv.check_adapter(chunks, RANK)
    names = {t.module.rsplit(".", 1)[-1] for t in plan.targets}
    assert names == ({"linear_qkv", "linear_proj"} if family == "qwen3_moe" else
                     {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"})
    qkv = next(t for t in plan.targets if t.module.endswith("linear_qkv"))
    assert qkv.a.shard.kind == "replicated" and qkv.b.shard == qkv.base.shard and qkv.b.layout.dims[0] == \
        qkv.base.layout.dims[0]
    proj = next(t for t in plan.targets if t.module.endswith("linear_proj"))
    assert proj.a.shard == proj.base.shard and proj.b.shard.kind == "replicated"
    hf_qkv = "qkv_proj" if family == "phi3" else "k_proj"
    text = explain(plan, f"base_model.model.model.layers.0.self_attn.{hf_qkv}.lora_B.weight", conv.spec.texts)
    assert "decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight" in text
    assert "split into parts by layout" in text


def test_gemma4_kv_layers_have_no_v_adapter(models, parallel):
    hf, _, _ = models["gemma4_moe"]
    conv = Converter.from_pretrained(hf)
    full = [t for t in conv.adapter_plan.targets if t.module.endswith("linear_qkv") and t.absent_parts]
    assert [t.base.layer for t in full] == [2, 4]
    assert all([p for p, _ in t.hf_modules] == ["q", "k"] for t in full)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_imports_with_parity_merge_and_exact_return(family, models, tmp_path, parallel):
    hf, adapter, _ = models[family]
    conv, chunks, settings = imported(hf, adapter)
    # PEFT draws q/k/v (gate/up) A matrices independently: the fused A's are stacked; Phi-3's fused HF modules
    # have one A each
    assert bool(settings.stacked) == (family != "phi3"), settings.stacked
    ids, vocab = ids_for(conv)
    got = megatron_logits(chunks[0], ids)[..., :vocab]
    reference = peft_model(hf, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    conv.export_adapter(chunks, tmp_path / "peft", settings)
    source, back = CheckpointReader(adapter), CheckpointReader(tmp_path / "peft")
    assert back.keys() == source.keys()
    assert all(torch.equal(source.get(k), back.get(k)) for k in source.keys())

    in_memory = conv.with_format(conv.spec.formats[0])  # the tensor layout of transformers' state_dict
    in_memory.export_merged(chunks, tmp_path / "merged", settings)
    merged = reference.merge_and_unload().state_dict()
    written = CheckpointReader(tmp_path / "merged")
    tied = {s.key for s in conv.plan.sentinels if s.kind == "tied"}
    assert written.keys() == set(merged) - tied
    assert all(within_one_ulp(written.get(k), merged[k]) for k in written.keys()), \
        [k for k in written.keys() if not within_one_ulp(written.get(k), merged[k])][:5]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_adapter_to_peft_and_back(family, models, tmp_path, parallel):
    hf, _, _ = models[family]
    conv, chunks, _ = imported(hf)
    settings = conv.add_adapter(chunks, RANK, ALPHA)
    randomise(conv, chunks)
    ids, vocab = ids_for(conv)
    got = megatron_logits(chunks[0], ids)[..., :vocab]
    conv.export_adapter(chunks, tmp_path / "peft", settings, base_model=str(hf))

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf) and config["r"] == RANK and config["lora_alpha"] == ALPHA
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    reference = peft_model(hf, tmp_path / "peft")
    result = set_peft_model_state_dict(reference, load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    conv2, chunks2, settings2 = imported(hf, tmp_path / "peft")
    assert not settings2.stacked
    before, after = adapter_tensors(chunks), adapter_tensors(chunks2)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_kv_adapter_rows_checked_on_export(models, tmp_path, parallel):
    hf, _, _ = models["gemma4_moe"]
    conv, chunks, _ = imported(hf)
    settings = conv.add_adapter(chunks, RANK, ALPHA)
    randomise(conv, chunks)
    tensors = adapter_tensors(chunks)
    target = next(t for t in conv.adapter_plan.targets if t.absent_parts)
    with torch.no_grad():
        tensors[target.b.mcore][-1].add_(1.0)  # the last V row of the last group
    with pytest.raises(ConversionError, match=f"part 'v' of .* in layer {target.base.layer}"):
        conv.export_adapter(chunks, tmp_path / "bad", settings)
    assert not (tmp_path / "bad").exists()
    conv.export_adapter(chunks, tmp_path / "dropped", settings, check_absent=False)
    keys = CheckpointReader(tmp_path / "dropped").keys()
    assert not any(f"layers.{target.base.layer}.self_attn.v_proj" in k for k in keys)
    assert any("layers.0.self_attn.v_proj.lora_B" in k for k in keys)
    with torch.no_grad():  # zero V rows play no part either
        split_rows = tensors[target.b.mcore]
        _zero_absent_rows(target, split_rows)
    conv.export_adapter(chunks, tmp_path / "zero_v", settings)


def _zero_absent_rows(t, b):
    from specbridge.runtime.ops import fuse, split

    parts = split(t.b.layout, b)
    for part in t.absent_parts:
        parts[part] = torch.zeros_like(parts[part])
    b.copy_(fuse(t.b.layout, parts))


def test_expert_adapters_refused(models, tmp_path, parallel):
    hf, _, _ = models["qwen3_moe"]
    conv, chunks, _ = imported(hf)
    with pytest.raises(UsageError, match="routed experts"):
        conv.import_adapter(chunks, peft_adapter(hf, tmp_path / "experts", HF_TARGETS["llama"]))


def test_bad_adapters_refused(models, tmp_path, parallel):
    from safetensors.torch import load_file, save_file

    hf, adapter, _ = models["llama"]
    conv, chunks, _ = imported(hf)
    (tmp_path / "extra").mkdir()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(RANK, 64)},
              str(tmp_path / "extra" / "adapter_model.safetensors"))
    (tmp_path / "extra" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="lm_head.lora_A.weight"):
        conv.import_adapter(chunks, tmp_path / "extra")
    (tmp_path / "dora").mkdir()
    save_file(tensors, str(tmp_path / "dora" / "adapter_model.safetensors"))
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UsageError, match="use_dora"):
        conv.import_adapter(chunks, tmp_path / "dora")
    with pytest.raises(UsageError, match="rank"):
        LoraSettings(0, 1.0)


def test_cli_import_with_adapter_export_adapter_only_and_merged(models, tmp_path, parallel, capsys):
    hf, adapter, _ = models["llama"]
    assert cli.main(["explain", "llama", "--config", str(hf),
                     "decoder.layers.1.mlp.linear_fc1.adapter.linear_out.weight"]) == 0
    shown = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj.lora_B.weight" in shown and "([gate | up] f) lora_rank" in shown
    assert cli.main(["check", "llama", "--config", str(hf), "--lora"]) == 0
    assert "LoRA: 12 adapted linears, 24 adapter tensors" in capsys.readouterr().out
    assert cli.main(["import", str(hf), str(tmp_path / "mcore"), "--adapter", str(adapter)]) == 0
    meta = json.loads((tmp_path / "mcore" / "specbridge.json").read_text())
    assert meta["adapter"]["rank"] == RANK and meta["adapter"]["peft_config"]["r"] == RANK
    assert cli.main(["export", str(tmp_path / "mcore"), str(tmp_path / "peft"), "--adapter-only"]) == 0
    source, back = CheckpointReader(adapter), CheckpointReader(tmp_path / "peft")
    assert back.keys() == source.keys() and all(torch.equal(source.get(k), back.get(k)) for k in source.keys())
    assert cli.main(["export", str(tmp_path / "mcore"), str(tmp_path / "merged"), "--merge"]) == 0
    merged = peft_model(hf, adapter).merge_and_unload().state_dict()
    written = CheckpointReader(tmp_path / "merged")
    assert written.keys() and all(within_one_ulp(written.get(k), merged[k]) for k in written.keys())
    assert (tmp_path / "merged" / "config.json").is_file()
    assert cli.main(["export", str(tmp_path / "mcore"), str(tmp_path / "both"), "--merge", "--adapter-only"]) == 2


def test_partial_targets_and_broken_block_structure(models, tmp_path, parallel):
    """A PEFT adapter on q and v only: K's rows of the fused B are zero, and stay unwritten on export (an adapter
    trained to change them is refused); a stacked A whose B left its block structure is refused too."""
    hf, _, _ = models["llama"]
    adapter = peft_adapter(hf, tmp_path / "qv", ["q_proj", "v_proj"])
    conv, chunks, settings = imported(hf, adapter)
    assert settings.targets == ("linear_qkv",) and settings.hf_targets == ("q_proj", "v_proj")
    ids, vocab = ids_for(conv)
    with torch.no_grad():
        expected = peft_model(hf, adapter)(input_ids=ids).logits.float()
    assert (megatron_logits(chunks[0], ids)[..., :vocab] - expected).abs().max().item() <= 1e-4
    conv.export_adapter(chunks, tmp_path / "back", settings)
    source, back = CheckpointReader(adapter), CheckpointReader(tmp_path / "back")
    assert back.keys() == source.keys() and all(torch.equal(source.get(k), back.get(k)) for k in source.keys())

    target = next(t for t in conv.adapter_plan.targets if t.module.endswith("linear_qkv"))
    b = adapter_tensors(chunks)[target.b.mcore]
    with torch.no_grad():
        b[0, -1] += 1.0  # a q row now reads v's rank columns
    with pytest.raises(ConversionError, match="no longer block-structured"):
        conv.export_adapter(chunks, tmp_path / "broken", settings)
    with torch.no_grad():
        b[0, -1] -= 1.0
        b[_k_row(target, b), 0] = 1.0
    with pytest.raises(ConversionError, match="has no adapter on 'model.layers.0.self_attn.k_proj'"):
        conv.export_adapter(chunks, tmp_path / "k_changed", settings)


def _k_row(t, b) -> int:
    """The first row of part k in the fused QKV B."""
    from specbridge.runtime.ops import fuse, split

    parts = split(t.b.layout, b)
    marked = {p: torch.full_like(v, float(p == "k")) for p, v in parts.items()}
    return int(fuse(t.b.layout, marked)[:, 0].nonzero()[0])


def test_derivation_and_proof_refuse_what_does_not_fit(models, parallel):
    import dataclasses

    from specbridge.compiler import adapters, ir
    from specbridge.errors import SpecError
    from specbridge.runtime.adapter_io import hf_adapter_manifest, mcore_adapter_manifest

    hf, _, _ = models["llama"]
    conv = Converter.from_pretrained(hf)
    plan = conv.plan
    qkv = next(m for m in plan.mappings if m.mcore.endswith("layers.0.self_attention.linear_qkv.weight"))
    scaled = dataclasses.replace(qkv, hf_to_mcore=(*qkv.hf_to_mcore, ir.ScaleBy("model.norm.weight")))
    with pytest.raises(SpecError, match="ScaleBy"):
        adapters.derive(dataclasses.replace(plan, mappings=(scaled,)))
    with pytest.raises(UsageError, match="linear_foo"):
        adapters.derive(plan, targets=("linear_foo",))
    with pytest.raises(UsageError, match="routed experts"):
        adapters.derive(plan, experts=True)

    chunks = conv.build_model()
    conv.add_adapter(chunks, RANK, ALPHA)
    adapter = conv.adapter_plan
    peft_side = hf_adapter_manifest(plan.architecture, conv.hf_config, adapter, RANK)
    mcore_side = mcore_adapter_manifest(chunks, plan.model)
    dropped = dataclasses.replace(mcore_side, tensors=mcore_side.tensors[1:])
    with pytest.raises(SpecError, match=mcore_side.tensors[0][0].replace(".", r"\.")):
        adapters.prove(adapter, peft_side, dropped)
    from specbridge.runtime.adapter_io import _target_modules

    every_q = [m for t in adapter.targets for p, m in t.hf_modules if p == "q"]
    assert _target_modules(every_q, plan.architecture, conv.hf_config) == ["q_proj"]
    assert _target_modules(every_q[:1], plan.architecture, conv.hf_config) == every_q[:1]  # not every q_proj
    wrong_rank = hf_adapter_manifest(plan.architecture, conv.hf_config, adapter, RANK + 1)
    with pytest.raises(SpecError, match="shape mismatch"):
        adapters.prove(adapter, wrong_rank, mcore_side)


def test_readme_lora_example(models, tmp_path, parallel):
    hf, peft_dir, _ = models["llama"]
    conv, chunks, _ = imported(hf)
    settings = conv.import_adapter(chunks, peft_dir)
    conv.export_adapter(chunks, tmp_path / "peft_out", settings)
    conv.export_merged(chunks, tmp_path / "hf_merged", settings)
    assert (tmp_path / "peft_out" / "adapter_config.json").is_file()
    assert (tmp_path / "hf_merged" / "config.json").is_file()
    fresh = conv.build_model()
    settings = conv.add_adapter(fresh, rank=16, alpha=32)
    assert settings.scale == 2.0 and all(not t.any() for k, t in adapter_tensors(fresh).items() if "linear_out" in k)
