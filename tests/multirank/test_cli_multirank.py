"""The CLI under torchrun: the same commands, multi-rank, with their report printed once (rank 0)."""

from tests.multirank.test_multirank import torchrun
from tests.support import save_tiny


def test_roundtrip_tp2_and_parity_pp2(tmp_path):
    hf = save_tiny("qwen3_moe", tmp_path / "hf", num_hidden_layers=4)
    result = torchrun(2, ["-m", "specbridge", "roundtrip", str(hf), "--tp", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("roundtrip: bit-exact") == 1
    result = torchrun(2, ["-m", "specbridge", "parity", str(hf), "--pp", "2", "--atol", "1e-4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top-1 agreement 100.00%") == 1
