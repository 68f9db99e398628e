"""The shipped specs, end to end on tiny random models: coverage proved, HF -> Megatron -> HF bit-exact,
fp32 logits equal to transformers' own model."""

from __future__ import annotations

import pytest
import torch

from specbridge.api import Converter
from specbridge.verify import parity, roundtrip
from tests.support import FAMILIES, save_tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_coverage_proved(family, checkpoints, parallel):
    conv = Converter.from_pretrained(checkpoints[family])
    plan = conv.check()
    assert plan.mappings and all(m.exact for m in plan.mappings)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_roundtrip_bit_exact(family, checkpoints, parallel):
    result = roundtrip(checkpoints[family])
    assert result.exact, result
    assert result.keys > 10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logit_parity(family, checkpoints, parallel):
    result = parity(checkpoints[family], seq_len=12)
    assert result.max_abs_diff <= 1e-4, result
    assert result.cosine >= 0.99999, result
    assert result.top1_agreement == 1.0, result


def test_qwen3_moe_both_on_disk_formats(tmp_path, parallel):
    """transformers holds Qwen3-MoE experts fused but saves them per expert: a checkpoint in either layout is
    read, and export writes back the layout that was read (or the one asked for)."""
    from safetensors.torch import save_file

    from specbridge.runtime.safetensors_io import CheckpointReader
    from tests.support import tiny_model

    model = tiny_model("qwen3_moe")
    model.save_pretrained(str(tmp_path / "per_expert"))
    (tmp_path / "fused").mkdir()
    model.config.save_pretrained(str(tmp_path / "fused"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    assert any(k.endswith("experts.gate_up_proj") for k in state)

    for fmt in ("per_expert", "fused"):
        conv = Converter.from_pretrained(tmp_path / fmt)
        assert conv.plan.format == fmt
        assert roundtrip(tmp_path / fmt).exact
        assert parity(tmp_path / fmt, seq_len=8).ok(atol=1e-4)

    conv = Converter.from_pretrained(tmp_path / "per_expert")
    chunks = conv.build_model()
    conv.import_weights(chunks, tmp_path / "per_expert")
    conv.with_format("fused").export_weights(chunks, tmp_path / "as_fused")
    written = CheckpointReader(tmp_path / "as_fused")
    assert written.keys() == set(state) and all(torch.equal(written.get(k), state[k]) for k in state)
