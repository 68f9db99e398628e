"""Bad-checkpoint corpus: every crafted input below must be refused by the CLI with exit 2 and one clean line
naming what is wrong (key, rule or file), never a traceback, and must never run code or touch a file outside.

Each row is data: (id, command, what to craft, the message the error must contain). `craft(kind, work)` builds
the input from a good tiny checkpoint (HF or Megatron, made once per module) inside `work` and returns the CLI
arguments; the generator functions are below the table. A crafted pickle would create the file `work/pwned`
when unpickled: the test asserts it does not exist afterwards.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specbridge.cli import main
from tests.support import rewrite_safetensors_header, save_tiny

CASES = [
    # HF checkpoints (import)
    ("index_parent_path", "import", "index_entry:../outside/model.safetensors", "not a plain file name"),
    ("index_absolute_path", "import", "index_entry:ABSOLUTE", "not a plain file name"),
    ("index_subdirectory", "import", "index_entry:sub/model.safetensors", "not a plain file name"),
    ("shard_symlink_out", "import", "symlink_out", "outside the checkpoint directory"),
    ("index_weight_map_list", "import", "weight_map_list", "'weight_map' must map tensor names"),
    ("index_not_json", "import", "index_garbage", "corrupt index file"),
    ("index_names_missing_shard", "import", "index_missing_shard", "do not exist"),
    ("duplicate_key_two_shards", "import", "duplicate_key", "is in two shard files"),
    ("shard_truncated", "import", "truncate:model.safetensors", "model.safetensors' describes tensor"),
    ("shard_header_garbage", "import", "header_garbage", "model.safetensors' has a corrupt header"),
    ("unsupported_dtype", "import", "header_dtype:F8_E8M0",
     "model.safetensors' holds tensor 'model.norm.weight' of dtype 'F8_E8M0', which is not supported"),
    ("tied_lm_head_differs", "import", "tied_lm_head", "holds a different 'lm_head.weight'"),
    ("hidden_size_string", "import", "config:hidden_size=\"64\"", "hidden_size"),
    ("config_not_json", "import", "config_garbage", "is not valid JSON"),
    ("stacked_experts_too_few", "import", "fused_too_few_experts", "has no entry 3"),
    ("missing_expert", "import", "missing_expert", "model.layers.1.mlp.experts.2.down_proj.weight"),
    ("fp32_tensor_in_bf16", "import", "bf16_with:model.norm.weight:float32", "tensor 'model.norm.weight' is F32"),
    ("int32_tensor_in_bf16", "import", "bf16_with:model.norm.weight:int32", "tensor 'model.norm.weight' is I32"),
    ("bool_tensor_in_bf16", "import", "bf16_with:model.norm.weight:bool", "tensor 'model.norm.weight' is BOOL"),
    ("unknown_tensor", "import", "extra_tensor", "which no rule of spec"),
    ("output_exists", "import", "output_exists", "pass --overwrite"),
    ("output_checked_first", "import", "output_exists_broken_input", "pass --overwrite"),
    ("output_is_input", "import", "output_is_input", "is (or contains) the input"),
    ("output_contains_input", "import", "output_contains_input", "is (or contains) the input"),
    ("overwrite_foreign_files", "import", "overwrite_foreign", "did not write"),
    ("output_is_a_file", "import", "output_file", "is not a directory"),
    # Megatron checkpoints (export)
    ("metadata_pickle_runs_code", "export", "evil_metadata", "is not a checkpoint-metadata type"),
    ("metadata_truncated", "export", "truncate:release/.metadata", "refusing"),
    ("common_pt_runs_code", "export", "evil_common", "refusing"),
    ("byte_item_runs_code", "export", "evil_byte_item", "refusing item"),
    ("tensor_item_runs_code", "export", "evil_tensor_item", "is not part of a saved tensor"),
    ("tensor_item_wrong_shape", "export", "tensor_item_swapped", "not a stored tensor of the expected"),
    ("tensor_shape_not_recorded", "export", "meta_shape:embedding.word_embeddings.weight", "shape [256, 64], not the [258, 64]"),
    ("tensor_shapes_garbage", "export", "meta_shapes_garbage", "'tensor_shapes' must map checkpoint keys"),
    ("config_reads_garbage", "export", "meta_reads_garbage", "'config_reads': a read must be a value"),
    ("recorded_key_missing", "export", "meta_shape:decoder.no_such.weight", "lacks tensor 'decoder.no_such"),
    ("storage_path_leaves", "export", "storage_path:../outside.distcp", "not a plain file name"),
    ("storage_entry_malformed", "export", "storage_offset", "a storage entry is not (file, offset, length)"),
    ("distcp_truncated", "export", "truncate:release/__0_0.distcp", "damaged"),
    ("distcp_missing", "export", "remove:release/*.distcp", "does not exist"),
    ("metadata_json_missing", "export", "remove:release/metadata.json", "missing or damaged"),
    ("tracker_leaves", "export", "tracker:../../elsewhere", "names neither 'release' nor an iteration"),
    ("release_symlink_out", "export", "release_symlink", "is not a directory inside the checkpoint"),
    ("specbridge_json_garbage", "export", "meta_garbage", "specbridge.json' is damaged"),
    ("specbridge_json_list", "export", "meta_list", "specbridge.json' is damaged"),
    ("specbridge_json_no_spec", "export", "meta_no_spec", "'spec' must be a dict"),
    ("spec_edited_since_import", "export", "spec_edited", "no spec with that content is at hand"),
    ("spec_path_not_followed", "export", "old_meta_evil_path", "no spec with that content is at hand"),
    ("hf_file_path_leaves", "export", "meta_hf_files_escape", "'hf_files' must list carried HF files"),
    ("spec_copy_path_leaves", "export", "spec_file_escape", "no spec with that content is at hand"),
    ("hf_files_dir_symlink", "export", "hf_symlink", "carried HF files are read only from inside"),
    ("hf_config_broken", "export", "meta_hf_config_broken", "does not load"),
    ("not_a_checkpoint", "export", "empty_dir", "no specbridge.json"),
    ("export_output_exists", "export", "output_exists", "pass --overwrite"),
    ("export_output_is_input", "export", "output_is_input", "is (or contains) the input"),
]


class _CreatesFile:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from specbridge.runtime.parallel import init_parallel

    base = tmp_path_factory.mktemp("good")
    hf = save_tiny("qwen3_moe", base / "hf")
    init_parallel()
    assert main(["import", str(hf), str(base / "mcore")]) == 0
    assert main(["export", str(base / "mcore"), str(base / "fused"), "--format", "fused"]) == 0
    tied = save_tiny("qwen3_tied", base / "tied")
    return {"hf": hf, "mcore": base / "mcore", "fused": base / "fused", "tied": tied}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(case, good, tmp_path, parallel, capsys):
    _, command, kind, expected = case
    argv = craft(command, kind, good, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().splitlines()[-1] == errors[0].rstrip(), err
    assert errors[0].startswith(f"specbridge {command}: error: ") and expected in errors[0], errors[0]
    assert not (tmp_path / "pwned").exists(), "a crafted pickle ran code"


def test_spec_copy_extending_a_file_outside_is_refused(good, tmp_path, parallel, capsys):
    """A spec copy in the checkpoint that extends a file outside it: a spanned spec error on the copy, nothing read
    from outside."""
    argv = craft("export", "spec_extends_outside", good, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err and "^" in err, err
    assert "spec/qwen3_moe.yaml:2:" in errors[0] and "which is outside" in errors[0], errors[0]


def test_corpus_covers_both_directions():
    kinds = {c[1] for c in CASES}
    assert kinds == {"import", "export"} and len(CASES) >= 40


# ---------------------------------------------------------------- generators


def craft(command: str, kind: str, good: dict, work: Path) -> list[str]:
    name, _, arg = kind.partition(":")
    out = work / "out"
    if command == "import":
        src = work / "hf"
        shutil.copytree(good["tied"] if name == "tied_lm_head" else good["fused"] if name.startswith("fused")
                        else good["hf"], src)
        argv = _HF[name](src, work, out, arg)
        return argv or ["import", str(src), str(out)]
    src = work / "mcore"
    shutil.copytree(good["mcore"], src)
    argv = _MCORE[name](src, work, out, arg)
    return argv or ["export", str(src), str(out)]


def _tensors(src: Path) -> dict:
    return load_file(str(src / "model.safetensors"))


def _index(src: Path, weight_map) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_entry(src, work, out, arg):
    tensors = _tensors(src)
    target = str(work / "outside.safetensors") if arg == "ABSOLUTE" else arg
    (work / "outside").mkdir()
    shutil.copy(src / "model.safetensors", work / "outside" / "model.safetensors")
    _index(src, {k: target for k in tensors})


def _symlink_out(src, work, out, arg):
    shutil.move(src / "model.safetensors", work / "elsewhere.safetensors")
    os.symlink(work / "elsewhere.safetensors", src / "model.safetensors")


def _weight_map_list(src, work, out, arg):
    _index(src, [[k, "model.safetensors"] for k in _tensors(src)])


def _index_garbage(src, work, out, arg):
    (src / "model.safetensors.index.json").write_text("{not json")


def _index_missing_shard(src, work, out, arg):
    _index(src, {k: "model-00002-of-00002.safetensors" for k in _tensors(src)})


def _duplicate_key(src, work, out, arg):
    tensors = _tensors(src)
    keys = sorted(tensors)
    (src / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in keys[: len(keys) // 2 + 1]}, str(src / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[len(keys) // 2:]}, str(src / "b.safetensors"))


def _truncate(src, work, out, arg):
    """Cut the file `arg` to half its size."""
    path = src / arg
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _header_dtype(src, work, out, arg):
    """One tensor of the shard claims the dtype `arg`."""
    rewrite_safetensors_header(src / "model.safetensors", lambda header: header["model.norm.weight"].update(dtype=arg))


def _header_garbage(src, work, out, arg):
    """The shard's header (its length prefix intact) is not JSON."""
    path = src / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8:8 + n] = b"{" + b"\xff" * (n - 1)
    path.write_bytes(raw)


def _tied_lm_head(src, work, out, arg):
    tensors = _tensors(src)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _config(src, work, out, arg):
    field, _, value = arg.partition("=")
    config = json.loads((src / "config.json").read_text())
    config[field] = json.loads(value)
    (src / "config.json").write_text(json.dumps(config))


def _config_garbage(src, work, out, arg):
    (src / "config.json").write_text("{\"model_type\": ")


def _fused_too_few_experts(src, work, out, arg):
    tensors = _tensors(src)
    key = "model.layers.1.mlp.experts.down_proj"
    tensors[key] = tensors[key][:3].clone()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _missing_expert(src, work, out, arg):
    tensors = _tensors(src)
    del tensors["model.layers.1.mlp.experts.2.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _bf16_with(src, work, out, arg):
    key, _, dtype = arg.partition(":")
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors(src).items()}
    tensors[key] = tensors[key].to(getattr(torch, dtype))
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _extra_tensor(src, work, out, arg):
    tensors = _tensors(src)
    tensors["model.layers.0.unexpected.weight"] = torch.zeros(2)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _output_exists(src, work, out, arg):
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _output_exists_broken_input(src, work, out, arg):
    _output_exists(src, work, out, arg)
    (src / "config.json").write_text("{broken")


def _output_is_input(src, work, out, arg):
    kind = "import" if (src / "config.json").exists() else "export"
    return [kind, str(src), str(src), "--overwrite"]


def _output_contains_input(src, work, out, arg):
    return ["import", str(src), str(work), "--overwrite"]


def _overwrite_foreign(src, work, out, arg):
    _output_exists(src, work, out, arg)
    return ["import", str(src), str(out), "--overwrite"]


def _output_file(src, work, out, arg):
    out.write_text("a file")


_HF = {"index_entry": _index_entry, "symlink_out": _symlink_out, "weight_map_list": _weight_map_list,
       "index_garbage": _index_garbage, "index_missing_shard": _index_missing_shard, "duplicate_key": _duplicate_key,
       "tied_lm_head": _tied_lm_head, "config": _config, "config_garbage": _config_garbage,
       "fused_too_few_experts": _fused_too_few_experts, "missing_expert": _missing_expert, "bf16_with": _bf16_with,
       "extra_tensor": _extra_tensor, "output_exists": _output_exists,
       "output_exists_broken_input": _output_exists_broken_input, "output_is_input": _output_is_input,
       "output_contains_input": _output_contains_input, "overwrite_foreign": _overwrite_foreign,
       "output_file": _output_file, "truncate": _truncate, "header_dtype": _header_dtype,
       "header_garbage": _header_garbage}


def _evil_metadata(src, work, out, arg):
    (src / "release" / ".metadata").write_bytes(pickle.dumps(_CreatesFile(work / "pwned")))


def _remove(src, work, out, arg):
    """Remove the file `arg` (the last of those matching, for a pattern)."""
    sorted(src.glob(arg))[-1].unlink()


def _evil_common(src, work, out, arg):
    torch.save({"args": _CreatesFile(work / "pwned")}, src / "release" / "common.pt")


def _rewrite_metadata(src, change) -> None:
    path = src / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # the test's own good checkpoint
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _evil_byte_item(src, work, out, arg):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    payload = pickle.dumps(_CreatesFile(work / "pwned"))
    shard = src / "release" / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)

    def change(metadata):
        index = next(i for i in metadata.storage_data
                     if isinstance(metadata.state_dict_metadata.get(i.fqn), BytesStorageMetadata))
        info = metadata.storage_data[index]
        metadata.storage_data[index] = type(info)(info.relative_path, offset, len(payload))

    _rewrite_metadata(src, change)


def _tensor_items(metadata):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return [i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata.get(i.fqn),
                                                          TensorStorageMetadata)]


def _evil_tensor_item(src, work, out, arg):
    """A tensor chunk whose blob is a torch.save of an object that runs code when unpickled."""
    buffer = io.BytesIO()
    torch.save(_CreatesFile(work / "pwned"), buffer)
    shard = src / "release" / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buffer.getvalue())

    def change(metadata):
        index = _tensor_items(metadata)[0]
        metadata.storage_data[index] = type(metadata.storage_data[index])(shard.name, offset, len(buffer.getvalue()))

    _rewrite_metadata(src, change)


def _tensor_item_swapped(src, work, out, arg):
    """Two tensor chunks of different shapes point at each other's bytes."""
    def change(metadata):
        items = _tensor_items(metadata)
        a = items[0]
        b = next(i for i in items if metadata.state_dict_metadata[i.fqn].size != metadata.state_dict_metadata[a.fqn].size)
        metadata.storage_data[a], metadata.storage_data[b] = metadata.storage_data[b], metadata.storage_data[a]

    _rewrite_metadata(src, change)


def _meta_shape(src, work, out, arg):
    meta = _meta(src)
    shape = meta["tensor_shapes"].get(arg, [128, 64])
    meta["tensor_shapes"][arg] = [shape[0] + 2, *shape[1:]]
    _write_meta(src, meta)


def _meta_shapes_garbage(src, work, out, arg):
    meta = _meta(src)
    meta["tensor_shapes"] = {"embedding.word_embeddings.weight": "large"}
    _write_meta(src, meta)


def _meta_reads_garbage(src, work, out, arg):
    meta = _meta(src)
    meta["config_reads"]["reads"]["config"]["hidden_size"] = {"code": "__import__('os').system('touch pwned')"}
    _write_meta(src, meta)


def _storage_path(src, work, out, arg):
    shutil.copy(src / "release" / "__0_0.distcp", work / "outside.distcp")

    def change(metadata):
        for index, info in list(metadata.storage_data.items()):
            metadata.storage_data[index] = type(info)(arg, info.offset, info.length)

    _rewrite_metadata(src, change)


def _storage_offset(src, work, out, arg):
    def change(metadata):
        index = next(iter(metadata.storage_data))
        info = metadata.storage_data[index]
        metadata.storage_data[index] = type(info)(info.relative_path, "0", info.length)

    _rewrite_metadata(src, change)


def _hf_symlink(src, work, out, arg):
    shutil.move(src / "hf", work / "hf_elsewhere")
    os.symlink(work / "hf_elsewhere", src / "hf")


def _tracker(src, work, out, arg):
    (src / "latest_checkpointed_iteration.txt").write_text(arg)


def _release_symlink(src, work, out, arg):
    shutil.move(src / "release", work / "release_elsewhere")
    os.symlink(work / "release_elsewhere", src / "release")


def _meta(src):
    return json.loads((src / "specbridge.json").read_text())


def _write_meta(src, meta) -> None:
    (src / "specbridge.json").write_text(json.dumps(meta))


def _meta_garbage(src, work, out, arg):
    (src / "specbridge.json").write_bytes(b"\x00\xffgarbage")


def _meta_list(src, work, out, arg):
    (src / "specbridge.json").write_text("[1, 2]")


def _meta_no_spec(src, work, out, arg):
    meta = _meta(src)
    meta["spec"] = "qwen3_moe"
    _write_meta(src, meta)


def _spec_edited(src, work, out, arg):
    """A custom spec whose copy in the checkpoint was edited after import (gate and up swapped)."""
    meta = _meta(src)
    meta["spec"] = {**meta["spec"], "name": "my_moe", "builtin": False}
    _write_meta(src, meta)
    copy = src / meta["spec"]["file"]
    copy.write_text(copy.read_text().replace("gate_proj", "GATE").replace("up_proj", "gate_proj")
                    .replace("GATE", "up_proj"))


def _old_meta_evil_path(src, work, out, arg):
    """An old-format specbridge.json whose 'spec' path names a file elsewhere: it is never followed."""
    meta = _meta(src)
    evil = work / "evil.yaml"
    evil.write_text((src / meta["spec"]["file"]).read_text())
    for key in ("format_version", "spec"):
        del meta[key]
    _write_meta(src, {**meta, "spec": str(evil), "spec_name": "evil", "digest": "0" * 16})
    shutil.rmtree(src / "spec")


def _custom_copy(src, work, text: str):
    """The checkpoint as written with a custom spec (not built-in) whose copy is `text`."""
    meta = _meta(src)
    meta["spec"] = {**meta["spec"], "name": "my_moe", "builtin": False}
    _write_meta(src, meta)
    (src / meta["spec"]["file"]).write_text(text)
    return meta


def _spec_extends_outside(src, work, out, arg):
    """The checkpoint's spec copy extends a file outside the checkpoint: it is not read."""
    (work / "outside.yaml").write_text((src / _meta(src)["spec"]["file"]).read_text())
    _custom_copy(src, work, f"spec: my_moe\nextends: {os.path.relpath(work / 'outside.yaml', src / 'spec')}\n")


def _spec_file_escape(src, work, out, arg):
    """specbridge.json names a spec copy outside the checkpoint: it is never followed."""
    meta = _meta(src)
    (work / "evil.yaml").write_text((src / meta["spec"]["file"]).read_text())
    shutil.rmtree(src / "spec")
    meta["spec"] = {**meta["spec"], "name": "my_moe", "builtin": False,
                    "file": os.path.relpath(work / "evil.yaml", src)}
    _write_meta(src, meta)


def _meta_hf_files_escape(src, work, out, arg):
    meta = _meta(src)
    meta["hf_files"] = ["../../../etc/hostname"]
    _write_meta(src, meta)


def _meta_hf_config_broken(src, work, out, arg):
    meta = _meta(src)
    meta["hf_config"]["hidden_size"] = "64"
    _write_meta(src, meta)


def _empty_dir(src, work, out, arg):
    shutil.rmtree(src)
    src.mkdir()


_MCORE = {"evil_tensor_item": _evil_tensor_item, "tensor_item_swapped": _tensor_item_swapped, "meta_shape": _meta_shape,
          "meta_shapes_garbage": _meta_shapes_garbage, "meta_reads_garbage": _meta_reads_garbage, "evil_metadata": _evil_metadata, "truncate": _truncate, "remove": _remove, "evil_common": _evil_common,
          "evil_byte_item": _evil_byte_item, "storage_path": _storage_path, "storage_offset": _storage_offset,
          "hf_symlink": _hf_symlink, "tracker": _tracker,
          "release_symlink": _release_symlink, "meta_garbage": _meta_garbage, "meta_list": _meta_list,
          "meta_no_spec": _meta_no_spec, "spec_edited": _spec_edited, "old_meta_evil_path": _old_meta_evil_path,
          "spec_extends_outside": _spec_extends_outside, "spec_file_escape": _spec_file_escape,
          "meta_hf_files_escape": _meta_hf_files_escape, "meta_hf_config_broken": _meta_hf_config_broken,
          "empty_dir": _empty_dir, "output_exists": _output_exists, "output_is_input": _output_is_input}
