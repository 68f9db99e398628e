"""Streaming weight sync (`Converter.iter_hf_weights`): the yielded tensors are the exported checkpoint, bit for
bit (names, dtypes, shapes, values; stacked experts included), in buckets that respect the bound (a larger single
tensor alone), with nothing written to disk and grad mode left alone; at TP2 the ranks' buckets together are the
checkpoint, each tensor once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specbridge.api import Converter
from specbridge.errors import UsageError
from specbridge.runtime.safetensors_io import CheckpointReader
from tests.support import save_tiny

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("stream_worker.py")


def _imported(hf_dir, fmt=None):
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model()
    conv.import_weights(chunks, hf_dir)
    return (conv.with_format(fmt) if fmt else conv), chunks


def assert_stream_is_export(buckets, exported: Path, bound: int) -> None:
    written = CheckpointReader(exported)
    names = [name for bucket in buckets for name, _ in bucket]
    assert len(names) == len(set(names)) and set(names) == written.keys()
    for bucket in buckets:
        assert bucket
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= bound or len(bucket) == 1, (nbytes, [n for n, _ in bucket])
        for name, tensor in bucket:
            stored = written.get(name)
            assert tensor.dtype == stored.dtype and tensor.shape == stored.shape, name
            assert torch.equal(tensor.contiguous().view(torch.uint8), stored.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("family, fmt", [("llama", None), ("qwen3_moe", None), ("qwen3_moe", "fused"),
                                         ("gemma4_moe", None), ("gemma4_dense", None)])
def test_stream_equals_export(family, fmt, tmp_path, parallel):
    hf_dir = save_tiny(family, tmp_path / "hf")
    conv, chunks = _imported(hf_dir, fmt)
    conv.export_weights(chunks, tmp_path / "exported")
    bound = 20_000
    before = set(os.listdir(tmp_path))
    buckets = []
    for bucket in conv.iter_hf_weights(chunks, bucket_bytes=bound):
        assert torch.is_grad_enabled()  # the export's no_grad does not leak into the caller between buckets
        buckets.append(bucket)
    assert set(os.listdir(tmp_path)) == before
    assert len(buckets) > 3
    assert any(len(b) > 1 for b in buckets)
    assert_stream_is_export(buckets, tmp_path / "exported", bound)


def test_one_bucket_when_the_bound_is_large(tmp_path, parallel):
    hf_dir = save_tiny("qwen3", tmp_path / "hf")
    conv, chunks = _imported(hf_dir)
    conv.export_weights(chunks, tmp_path / "exported")
    buckets = list(conv.iter_hf_weights(chunks, bucket_bytes=1 << 40))
    assert len(buckets) == 1
    assert_stream_is_export(buckets, tmp_path / "exported", 1 << 40)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_in_the_export_not_in_the_caller(enabled, tmp_path, parallel):
    """Python's collector is off while an export step converts tensors (its full collections over the caller's
    whole process cost 3x a stream's time) and as the caller had it while the caller holds a bucket."""
    import gc

    from specbridge.runtime import exporter

    hf_dir = save_tiny("llama", tmp_path / "hf")
    conv, chunks = _imported(hf_dir)
    inside, original = [], exporter._emit

    def emit(*args, **kwargs):
        inside.append(gc.isenabled())
        return original(*args, **kwargs)

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(exporter, "_emit", emit)
            between = [gc.isenabled() for _ in conv.iter_hf_weights(chunks, bucket_bytes=20_000)]
            conv.export_weights(chunks, tmp_path / "exported")
        assert len(between) > 3 and set(between) == {enabled} and gc.isenabled() is enabled
        assert inside and set(inside) == {False}
    finally:
        gc.enable()


@pytest.mark.parametrize("bound", [0, -5])
def test_bound_must_be_positive(bound, tmp_path, parallel):
    hf_dir = save_tiny("llama", tmp_path / "hf")
    conv, chunks = _imported(hf_dir)
    with pytest.raises(UsageError, match="bucket_bytes"):
        conv.iter_hf_weights(chunks, bucket_bytes=bound)


@pytest.mark.parametrize("family, flags", [("llama", ["--tp", "2"]), ("qwen3_moe", ["--ep", "2"])])
def test_stream_at_two_ranks(family, flags, tmp_path):
    hf_dir = save_tiny(family, tmp_path / "hf", num_hidden_layers=4)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(hf_dir), str(out), "20000", *flags]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    buckets = []
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        tensors = torch.load(out / f"rank{rank}.pt")
        buckets += [[(name, tensors[name]) for name in names] for names in report["buckets"]]
    ranks_with_tensors = [r for r in range(2) if json.loads((out / f"rank{r}.json").read_text())["buckets"]]
    # dense tensors come on TP rank 0; expert groups are spread over the EP ranks that write them
    assert ranks_with_tensors == ([0, 1] if "--ep" in flags else [0])
    assert_stream_is_export(buckets, out / "hf", 20000)
