"""The CLI under torchrun: the same commands, multi-rank, with their report printed once (rank 0)."""

import json
import os
import subprocess
import sys

from specbridge.verify import compare_checkpoints
from tests.multirank.test_multirank import ROOT, torchrun
from tests.support import save_tiny


def test_roundtrip_tp2_and_parity_pp2(tmp_path):
    hf = save_tiny("qwen3_moe", tmp_path / "hf", num_hidden_layers=4)
    result = torchrun(2, ["-m", "specbridge", "roundtrip", str(hf), "--tp", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("roundtrip: bit-exact") == 1
    result = torchrun(2, ["-m", "specbridge", "parity", str(hf), "--pp", "2", "--atol", "1e-4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top-1 agreement 100.00%") == 1


def test_odd_vocabulary_at_tp2(tmp_path):
    """A vocabulary TP does not divide is padded as Megatron pads it (333 -> 512 rows at TP 2): logits equal
    transformers', the round trip is bit-exact, and a checkpoint written at TP 2 exports at TP 1."""
    hf = save_tiny("qwen3", tmp_path / "hf", vocab_size=333, num_hidden_layers=2)
    result = torchrun(2, ["-m", "specbridge", "parity", str(hf), "--tp", "2", "--atol", "1e-4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top-1 agreement 100.00%") == 1
    mcore = tmp_path / "mcore"
    result = torchrun(2, ["-m", "specbridge", "import", str(hf), str(mcore), "--tp", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((mcore / "specbridge.json").read_text())["padded_vocab_size"] == 512
    back = tmp_path / "back"
    result = subprocess.run([sys.executable, "-m", "specbridge", "export", str(mcore), str(back)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert compare_checkpoints(hf, back).exact


def test_odd_vocabulary_roundtrip_at_tp2(tmp_path):
    hf = save_tiny("llama_tied", tmp_path / "hf", vocab_size=397, num_hidden_layers=2)
    result = torchrun(2, ["-m", "specbridge", "roundtrip", str(hf), "--tp", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("roundtrip: bit-exact") == 1


def test_export_split_over_ranks(tmp_path):
    """`specbridge export` under torchrun reads the checkpoint directly, each rank the tensors it writes (whole
    expert groups, split by bytes): bit-exact, and the same files' content as a single-rank export."""
    hf = save_tiny("qwen3_moe_mixed", tmp_path / "hf")
    mcore = tmp_path / "mcore"
    result = torchrun(2, ["-m", "specbridge", "import", str(hf), str(mcore), "--ep", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    back = tmp_path / "back"
    result = torchrun(2, ["-m", "specbridge", "export", str(mcore), str(back)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("export: ") == 1
    assert compare_checkpoints(hf, back).exact
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # both ranks wrote shards
