"""Faults under torchrun: every rank ends, within a bounded time, with a clear error naming key, rule and rank,
and no partial output is left behind."""

from __future__ import annotations

import json
import re

from safetensors.torch import load_file, save_file

from tests.multirank.test_multirank import torchrun
from tests.support import save_tiny


def _no_output(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.specbridge-*"))


def test_missing_key_fails_on_every_rank(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "mcore"
    result = torchrun(2, ["-m", "specbridge", "import", str(hf), str(out), "--tp", "2"], timeout=180)
    assert result.returncode != 0
    assert "the checkpoint has no tensor 'model.layers.1.mlp.down_proj.weight'" in result.stderr
    assert "llama.yaml:" in result.stderr and "rank 0" in result.stderr and "rank 1" in result.stderr
    assert "specbridge/" not in "".join(l for l in result.stderr.splitlines() if l.lstrip().startswith("File "))
    _no_output(out)


def test_corrupt_shard_read_by_one_rank_ends_every_rank(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf", max_shard_size="100KB", num_hidden_layers=4)
    weight_map = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, set[int]] = {}
    for key, file in weight_map.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        files.setdefault(file, set()).add(int(match.group(1)) if match else -1)
    last_stage_only = next(f for f, layers in sorted(files.items()) if layers <= {2, 3})
    path = hf / last_stage_only
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "back"
    result = torchrun(2, ["-m", "specbridge", "roundtrip", str(hf), "--pp", "2", "--keep", str(out)], timeout=180)
    assert result.returncode != 0
    assert last_stage_only in result.stderr and "rank 1" in result.stderr
    assert re.search(r"key 'model\.layers\.[23]\.", result.stderr) and "llama.yaml:" in result.stderr
    _no_output(out)
