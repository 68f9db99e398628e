"""The shipped specs, end to end on tiny random models: coverage proved, HF -> Megatron -> HF bit-exact,
fp32 logits equal to transformers' own model."""

from __future__ import annotations

import pytest

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
