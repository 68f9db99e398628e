"""Direct reads (file -> parameter memory by preadv): the same parameters, bit for bit, as the general path
(read, build the local tensor, copy), on every family and in bf16; broken headers and truncated files are
`ConversionError`s; a fused QKV is filled by one read per (query group, part)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from specbridge.api import Converter
from specbridge.errors import ConversionError
from specbridge.runtime import direct_read, dtypes
from specbridge.runtime.placement import local_tensors
from tests.support import FAMILIES, rewrite_safetensors_header, save_tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    return {family: save_tiny(family, root / family, max_shard_size="100KB") for family in FAMILIES}


def _import(hf_dir, dtype=None, direct=True, monkeypatch=None, cast=False):
    """(parameters, bytes read, mappings filled directly)."""
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model(params_dtype=dtype)
    filled = []
    original = direct_read.DirectReader.fill

    def fill(self, target, mapping, rank, size):
        ok = direct and original(self, target, mapping, rank, size)
        filled.append(ok)
        return ok

    monkeypatch.setattr(direct_read.DirectReader, "fill", fill)
    reader = conv.import_weights(chunks, hf_dir, cast=cast)
    params = {k: v.detach().clone() for k, v in local_tensors(chunks).items()}
    return params, reader.bytes_read, sum(filled), len(filled)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_direct_equals_general_path(family, checkpoints, monkeypatch, parallel):
    direct, direct_bytes, n_direct, n = _import(checkpoints[family], monkeypatch=monkeypatch)
    general, general_bytes, _, _ = _import(checkpoints[family], direct=False, monkeypatch=monkeypatch)
    assert direct.keys() == general.keys()
    assert [k for k in direct if not torch.equal(direct[k], general[k])] == []
    assert direct_bytes == general_bytes
    assert n_direct == n  # every mapping of the shipped specs is placed directly at TP1


def test_bf16_checkpoint_into_bf16_parameters(tmp_path, monkeypatch, parallel):
    hf_dir = save_tiny("qwen3_moe", tmp_path / "hf")
    model_dir = tmp_path / "bf16"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16).save_pretrained(str(model_dir))
    direct, _, n_direct, n = _import(model_dir, torch.bfloat16, monkeypatch=monkeypatch)
    general, _, _, _ = _import(model_dir, torch.bfloat16, direct=False, monkeypatch=monkeypatch)
    assert [k for k in direct if not torch.equal(direct[k], general[k])] == []
    kept_fp32 = [k for k, t in direct.items() if t.dtype != torch.bfloat16]  # megatron-core's torch norms
    assert all(k.endswith("layernorm.weight") for k in kept_fp32)
    assert n_direct == n - len(kept_fp32)  # only those (a dtype change) take the general path


def test_dtype_change_takes_the_general_path(checkpoints, monkeypatch, parallel):
    params, _, n_direct, n = _import(checkpoints["llama"], torch.bfloat16, monkeypatch=monkeypatch, cast=True)
    kept_fp32 = sum(t.dtype == torch.float32 for t in params.values())  # megatron-core's torch norms
    assert n_direct == kept_fp32 < n


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: the parts are blocks of rows of one qkv_proj
def test_fused_qkv_is_one_read_per_group_and_part(family, checkpoints):
    conv = Converter.from_pretrained(checkpoints[family])
    chunks = conv.build_model()
    target = local_tensors(chunks)["decoder.layers.0.self_attention.linear_qkv.weight"]
    mapping = conv.plan.by_mcore()["decoder.layers.0.self_attention.linear_qkv.weight"]
    with direct_read.DirectReader(_reader(checkpoints[family])) as direct:
        plan = direct_read.plan_reads(target, mapping, direct.entry, 0, 1)
    groups = conv.hf_config.num_key_value_heads
    assert len(plan.reads) == 3 * groups
    assert sum(r.nbytes for r in plan.reads) == target.numel() * target.element_size()
    assert sorted((r.into, r.into + r.nbytes) for r in plan.reads)[-1][1] == target.numel() * 4
    # at TP2, rank 1 reads the second half of the groups only
    with direct_read.DirectReader(_reader(checkpoints[family])) as direct:
        half = target.view(2, -1)[1].view(-1, target.shape[1])
        plan = direct_read.plan_reads(half.clone(), mapping, direct.entry, 1, 2)
    assert len(plan.reads) == 3 * groups // 2


def _reader(hf_dir):
    from specbridge.runtime.safetensors_io import CheckpointReader

    return CheckpointReader(hf_dir)


def _first_shard(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    return hf_dir / sorted(set(index["weight_map"].values()))[0]


def test_header_beyond_the_file_is_rejected(tmp_path):
    hf_dir = save_tiny("llama", tmp_path / "hf", max_shard_size="100KB")
    shard = _first_shard(hf_dir)

    def lie(header):
        key = next(k for k in header if k != "__metadata__")
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin + 10**9, end + 10**9]

    rewrite_safetensors_header(shard, lie)
    with pytest.raises(ConversionError, match="beyond the end of the file"):
        direct_read.read_header(shard)


@pytest.mark.parametrize("prefix", [b"", b"\x00" * 8, (1 << 40).to_bytes(8, "little")])
def test_bad_header_length_is_rejected(tmp_path, prefix):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(prefix + b"{}")
    with pytest.raises(ConversionError, match="header length"):
        direct_read.read_header(path)


def test_truncated_file_is_a_conversion_error(tmp_path, parallel):
    hf_dir = save_tiny("llama", tmp_path / "hf", max_shard_size="100KB")
    shard = _first_shard(hf_dir)
    raw = shard.read_bytes()
    # keep the header, drop the data: the header check catches it before any read
    shard.write_bytes(raw[:len(raw) // 2])
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model()
    with pytest.raises(ConversionError):
        conv.import_weights(chunks, hf_dir)


def test_reader_takes_keys_shapes_and_dtypes_from_the_validated_header(checkpoints, tmp_path, monkeypatch,
                                                                       parallel):
    """Keys, shapes and dtypes are safetensors' own answers, with an index and without one, while `safe_open` is
    unusable: the reader parses each header once, itself; an import reads the same parameters through it."""
    import safetensors
    import safetensors.torch
    from safetensors import safe_open

    from specbridge.runtime import safetensors_io

    hf_dir = checkpoints["qwen3_moe"]
    expected = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            expected.update({k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                             for k in handle.keys()})
    before, _, _, _ = _import(hf_dir, monkeypatch=monkeypatch)
    bare = tmp_path / "bare"  # the shards without their index: every header is read to list the keys
    shutil.copytree(hf_dir, bare)
    (bare / "model.safetensors.index.json").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open called")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    assert not hasattr(safetensors_io, "safe_open")
    for directory in (hf_dir, bare):
        reader = _reader(directory)
        assert {k: (reader.shape(k), reader.dtype(k)) for k in reader.keys()} == expected
    after, _, _, _ = _import(bare, monkeypatch=monkeypatch)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_unsupported_dtype_names_the_file_tensor_and_dtype(checkpoints, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(checkpoints["llama"], hf_dir)
    shard = _first_shard(hf_dir)
    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    key = min(k for k, file in weight_map.items() if file == shard.name)
    rewrite_safetensors_header(shard, lambda header: header[key].update(dtype="F8_E8M0"))
    reader = _reader(hf_dir)  # with an index, a header is read when first asked
    with pytest.raises(ConversionError) as info:
        reader.shape(key)
    assert str(info.value) == (f"safetensors file '{shard}' holds tensor '{key}' of dtype 'F8_E8M0', which is not "
                               f"supported (known: {', '.join(dtypes.SAFETENSORS)}) [key '{key}']")


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path)) for line in f)


def test_general_path_reads_are_views_of_maps_that_die_with_them(checkpoints):
    """`CheckpointReader.get` gives safetensors' own values (whole, one stacked slice, rows, columns) as views of
    a private map of just those bytes; the map (and the file-backed pages it touched) goes with the last view."""
    from safetensors import safe_open

    hf_dir = checkpoints["qwen3_moe"]
    reader = _reader(hf_dir)
    key = next(k for k in sorted(reader.keys()) if k.endswith("mlp.experts.gate_up_proj")
               or k.endswith("down_proj.weight"))
    file, entry = reader.entry(key)
    with safe_open(str(hf_dir / file), "pt") as handle:
        whole = handle.get_tensor(key).clone()
    stacked = len(entry.shape) == 3
    base = whole[1] if stacked else whole
    index = 1 if stacked else None
    rows, cols = (1, base.shape[0] - 1), (1, base.shape[1] - 2)
    path = (hf_dir / file).resolve()
    before = _maps_of(path)
    got = [reader.get(key), reader.get(key, index, rows=rows), reader.get(key, index, cols=cols),
           reader.get(key, index, rows=rows, cols=cols)]
    expected = [whole, base[rows[0]:rows[1]], base[:, cols[0]:cols[1]], base[rows[0]:rows[1], cols[0]:cols[1]]]
    assert all(torch.equal(g, e) and g.dtype == e.dtype for g, e in zip(got, expected))
    assert _maps_of(path) == before + 4
    got[0].fill_(0)  # a private map: the file never changes
    assert torch.equal(reader.get(key), whole)
    del got
    assert _maps_of(path) == before


@pytest.mark.parametrize("size,padded", [(1, 0), (1, 5), (2, 0), (2, 3), (3, 7)])
def test_vocab_shard_is_read_in_place_and_padding_zeroed(checkpoints, size, padded):
    """Each rank's vocab rows (with the padding megatron-core adds after the real vocabulary) are read straight
    into the shard, bit for bit as the general path builds them; rows past the vocabulary are zeros."""
    from specbridge.runtime import importer

    hf_dir = checkpoints["llama"]
    conv = Converter.from_pretrained(hf_dir)
    mapping = conv.plan.by_mcore()["embedding.word_embeddings.weight"]
    reader = _reader(hf_dir)
    vocab, hidden = reader.shape(mapping.sources[0].key)
    rows = -(-(vocab + padded) // size)
    for rank in range(size):
        target = torch.full((rows, hidden), float("nan"), dtype=reader.entry(mapping.sources[0].key)[1].dtype)
        with direct_read.DirectReader(reader) as direct:
            assert direct.fill(target, mapping, rank, size)
        general = importer._build_local(mapping, reader, rank, size, tuple(target.shape))
        assert torch.equal(target, general.to(target.dtype))
        real = max(0, min(rows, vocab - rank * rows))
        assert not target[real:].any()


@pytest.mark.parametrize("enabled", [True, False])
def test_import_leaves_the_collector_as_it_found_it(checkpoints, parallel, enabled):
    """The collector is paused while the import fills tensors (also when it fails), then left as it was."""
    import gc

    hf_dir = checkpoints["llama"]
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model()
    seen = []
    original = direct_read.DirectReader.fill

    def fill(self, target, mapping, rank, size):
        seen.append(gc.isenabled())
        if len(seen) == 3:
            raise ConversionError("stop here")
        return original(self, target, mapping, rank, size)

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(direct_read.DirectReader, "fill", fill)
            with pytest.raises(ConversionError, match="stop here"):
                conv.import_weights(chunks, hf_dir)
        assert seen == [False] * 3 and gc.isenabled() is enabled
    finally:
        gc.enable()
