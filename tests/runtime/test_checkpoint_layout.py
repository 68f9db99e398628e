"""Megatron checkpoints written by `specbridge import`: Megatron-LM's layout, portable metadata, the source's
dtype and HF files kept, and `export` back to exactly the source (tensors, config.json, carried files)."""

from __future__ import annotations

import json
import queue
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from specbridge.cli import main
from specbridge.runtime import mcore_checkpoint
from specbridge.verify import compare_checkpoints
from tests.support import save_tiny, tiny_model

CARRIED = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 128}',
           "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    hf = save_tiny("qwen3_moe", tmp_path_factory.mktemp("layout") / "hf")
    for name, text in CARRIED.items():
        (hf / name).write_text(text)
    return hf


@pytest.fixture(scope="module")
def mcore(hf, tmp_path_factory):
    from specbridge.runtime.parallel import init_parallel

    init_parallel()
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    assert main(["import", str(hf), str(out)]) == 0
    return out


def test_layout_is_megatron_lms(mcore):
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    release = mcore / "release"
    assert json.loads((release / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    from megatron.core.dist_checkpointing import load_common_state_dict

    common = load_common_state_dict(str(release))  # common.pt, or (megatron-core 0.19) inside the .distcp
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    args = vars(common["args"])
    expected = {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                "group_query_attention": True, "kv_channels": 24, "num_experts": 4, "moe_ffn_hidden_size": 40,
                "moe_router_topk": 2, "padded_vocab_size": 256, "max_position_embeddings": 128,
                "normalization": "RMSNorm", "position_embedding_type": "rope", "swiglu": True,
                "untie_embeddings_and_output_weights": True, "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1, "ckpt_format": "torch_dist"}
    assert {k: args.get(k) for k in expected} == expected
    model = yaml.safe_load((release / "run_config.yaml").read_text())["model"]
    assert {k: model[k] for k in ("num_layers", "hidden_size", "num_moe_experts", "vocab_size")} == \
        {"num_layers": 3, "hidden_size": 64, "num_moe_experts": 4, "vocab_size": 256}


def test_metadata_is_portable(mcore, hf, tmp_path, parallel):
    text = (mcore / "specbridge.json").read_text()
    meta = json.loads(text)
    assert meta["spec"]["name"] == "qwen3_moe" and meta["spec"]["builtin"] and len(meta["spec"]["digest"]) == 16
    assert str(hf) not in text and str(mcore) not in text and '"/' not in text
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(mcore, moved)
    assert main(["export", str(moved), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact


def test_export_equals_source(mcore, hf, tmp_path, parallel):
    """config.json is the source's, generation config, tokenizer files and chat template come along."""
    assert main(["export", str(mcore), str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    for name in [*CARRIED, "generation_config.json"]:
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    assert compare_checkpoints(hf, back).exact


def test_custom_spec_travels_with_the_checkpoint(hf, tmp_path, parallel):
    from specbridge.api import builtin_specs

    custom = tmp_path / "my_moe.yaml"
    custom.write_text(builtin_specs()["qwen3_moe"].read_text().replace("spec: qwen3_moe", "spec: my_moe", 1))
    assert main(["import", str(hf), str(tmp_path / "mcore"), "--spec", str(custom)]) == 0
    meta = json.loads((tmp_path / "mcore" / "specbridge.json").read_text())
    assert meta["spec"]["builtin"] is False and meta["spec"]["file"] == "spec/my_moe.yaml"
    assert (tmp_path / "mcore" / "spec" / "my_moe.yaml").read_text() == custom.read_text()
    custom.unlink()
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact


def test_custom_spec_chain_travels_with_the_checkpoint(hf, tmp_path, parallel):
    """A custom spec extending a custom base beside it: the checkpoint carries both, and exports elsewhere."""
    from specbridge.api import builtin_specs

    specs = tmp_path / "specs"
    (specs / "common").mkdir(parents=True)
    base = builtin_specs()["qwen3_moe"].read_text().replace("spec: qwen3_moe", "spec: my_base", 1)
    (specs / "common" / "my_base.yaml").write_text(base)
    (specs / "my_moe.yaml").write_text("spec: my_moe\nextends: common/my_base.yaml\n")
    assert main(["import", str(hf), str(tmp_path / "mcore"), "--spec", str(specs / "my_moe.yaml")]) == 0
    copy = tmp_path / "mcore" / "spec"
    assert (copy / "common" / "my_base.yaml").read_text() == base
    shutil.rmtree(specs)
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact


def test_export_reads_the_bare_layout_of_earlier_versions(mcore, hf, tmp_path, parallel):
    bare = tmp_path / "bare"
    shutil.copytree(mcore / "release", bare)
    meta = json.loads((mcore / "specbridge.json").read_text())
    old = {"spec": "/somewhere/on/another/machine/qwen3_moe.yaml", "spec_name": "qwen3_moe",
           "digest": meta["spec"]["digest"], "architecture": meta["architecture"], "format": meta["format"],
           "hf_config": meta["hf_config"], "written_with": meta["written_with"]}
    (bare / "specbridge.json").write_text(json.dumps(old))
    assert main(["export", str(bare), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact


def test_checkpoint_files_hold_megatron_cores_own_bytes(hf, tmp_path, monkeypatch, parallel):
    """Each file is written direct (`file_writes.AppendedFile`), and is byte for byte what megatron-core's own
    per-file writer makes of the same bucket."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from specbridge.runtime import file_writes

    direct, real = [], file_writes.AppendedFile.__init__

    def spy(self, path):
        real(self, path)
        direct.append(self._out is not None)

    monkeypatch.setattr(file_writes.AppendedFile, "__init__", spy)
    assert main(["import", str(hf), str(tmp_path / "ours")]) == 0
    with file_writes.OutputFile(tmp_path / "probe", 0) as probe:  # direct where this file system can
        assert direct and all(direct) == probe.direct

    def megatron_cores(transforms, bucket):
        results, count = queue.Queue(), queue.Queue()
        count.put(0)
        FileSystemWriterAsync.write_preloaded_data(transforms, 0, bucket, results, count, use_fsync=False)
        return results.get()[1]

    monkeypatch.setattr(mcore_checkpoint, "_write_bucket", megatron_cores)
    assert main(["import", str(hf), str(tmp_path / "theirs")]) == 0
    files = sorted(p.name for p in (tmp_path / "ours" / "release").glob("*.distcp"))
    assert files and files == sorted(p.name for p in (tmp_path / "theirs" / "release").glob("*.distcp"))
    for name in files:
        assert (tmp_path / "ours" / "release" / name).read_bytes() == \
            (tmp_path / "theirs" / "release" / name).read_bytes(), name


def _checkpoint_dtypes(directory) -> set[torch.dtype]:
    metadata = mcore_checkpoint.vet(mcore_checkpoint.dist_directory(directory))
    return {entry.properties.dtype for entry in metadata.state_dict_metadata.values() if hasattr(entry, "properties")}


def test_bf16_checkpoint_stays_bf16(tmp_path, parallel):
    from specbridge.api import Converter

    hf = tmp_path / "hf"
    tiny_model("qwen3").to(torch.bfloat16).save_pretrained(str(hf))
    # every parameter, the norms too (megatron-core's local spec builds torch norms in fp32 whatever the dtype)
    chunks = Converter.from_pretrained(hf).build_model(torch.bfloat16)
    assert {p.dtype for chunk in chunks for p in chunk.parameters()} == {torch.bfloat16}
    assert main(["import", str(hf), str(tmp_path / "mcore")]) == 0
    assert mcore_checkpoint.tensor_dtype(tmp_path / "mcore") == torch.bfloat16
    assert _checkpoint_dtypes(tmp_path / "mcore") == {torch.bfloat16}
    assert json.loads((tmp_path / "mcore" / "specbridge.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "back")]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "back" / "model.safetensors")).values()} == {torch.bfloat16}
    assert compare_checkpoints(hf, tmp_path / "back").exact


def test_explicit_dtype_casts_and_reports(tmp_path, parallel, capsys):
    hf = tmp_path / "hf"
    tiny_model("qwen3").to(torch.bfloat16).save_pretrained(str(hf))
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float() + 2 ** -12  # not a bf16 value
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["import", str(hf), str(tmp_path / "mcore"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "cast 1 tensor(s) float32 -> bfloat16: model.norm.weight" in out
    assert main(["import", str(hf), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 -> float32" in out and "float32 -> bfloat16" not in out
    assert mcore_checkpoint.tensor_dtype(tmp_path / "fp32") == torch.float32


def test_config_dtype_never_changes_tensors(tmp_path, parallel):
    hf = save_tiny("qwen3", tmp_path / "hf")  # fp32 tensors
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert main(["import", str(hf), str(tmp_path / "mcore")]) == 0
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact  # fp32 in, fp32 out, bit for bit
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}


def test_api_refuses_lossy_casts_unless_asked(tmp_path, parallel):
    from specbridge.api import Converter
    from specbridge.errors import ConversionError

    hf = save_tiny("qwen3", tmp_path / "hf")
    conv = Converter.from_pretrained(hf)
    assert conv.source_dtype == torch.float32
    chunks = conv.build_model(params_dtype=torch.bfloat16)
    with pytest.raises(ConversionError, match="importing would change values"):
        conv.import_weights(chunks, hf)
    conv.import_weights(chunks, hf, cast=True)
    bf16 = tmp_path / "bf16"
    tiny_model("qwen3").to(torch.bfloat16).save_pretrained(str(bf16))
    wide = Converter.from_pretrained(bf16)
    chunks = wide.build_model(params_dtype=torch.float32)
    wide.import_weights(chunks, bf16)  # bf16 -> fp32 keeps every value
    wide.export_weights(chunks, tmp_path / "back", dtype=torch.bfloat16)
    assert compare_checkpoints(bf16, tmp_path / "back").exact


def test_check_detects_the_format_of_a_checkpoint_directory(mcore, hf, tmp_path, parallel, capsys):
    """Like import: a directory's format comes from its keys (a config.json alone gets the spec's first format)."""
    assert main(["export", str(mcore), str(tmp_path / "fused"), "--format", "fused"]) == 0
    for config, fmt in ((hf, "per_expert"), (hf / "config.json", "fused"), (tmp_path / "fused", "fused")):
        capsys.readouterr()
        assert main(["check", "qwen3_moe", "--config", str(config)]) == 0
        assert f"format '{fmt}'" in capsys.readouterr().out, config
