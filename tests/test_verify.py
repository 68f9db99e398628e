"""Parity reporting: a verdict (PASS/FAIL) naming each threshold missed, cosine in fp64 and never above 1,
positions counting the logit vectors compared; a failing parity exits 1 from the CLI."""

from __future__ import annotations

import pytest
import torch

from specbridge.errors import ConversionError
from specbridge.verify import LogitComparison, Parity, compare_logits


def logits(seed: int = 0, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_equal_logits_pass_with_cosine_at_most_one():
    big = logits() * 1e4 + 3e5  # fp32 cosine of such vectors rounds above 1
    result = compare_logits(big, big.clone())
    assert result.ok(atol=0.0) and result.cosine <= 1.0 and result.max_abs_diff == 0.0
    text = result.summary(atol=1e-4)
    assert text.startswith("parity: PASS [required: cosine >= 0.99999, top-1 agreement 100%, max |logit diff| <= ")
    assert "cosine 1.0000000" in text and "top-1 agreement 100.00%" in text and "1.0000001" not in text
    assert "10 positions x 11 logits compared" in text and result.positions == 10


def test_a_failing_parity_names_every_threshold_it_missed():
    expected = logits()
    got = expected.clone()
    got[0, 0] = -got[0, 0]  # one position flipped: cosine and top-1 both suffer
    result = compare_logits(got, expected)
    failures = result.failures(atol=1e-4)
    assert [f.split(" ")[0] for f in failures] == ["cosine", "top-1", "max"]
    text = result.summary(atol=1e-4)
    assert text.startswith("parity: FAIL (cosine 0.") and "< 0.99999" in text and "90.00% < 100%" in text
    assert "> atol 0.0001" in text and not result.ok(atol=1e-4)
    assert compare_logits(got, expected).ok(min_cosine=-1.0) is False  # top-1 still fails


def test_nan_fails_every_threshold():
    expected = logits()
    got = expected.clone()
    got[1, 2, 3] = float("nan")
    result = compare_logits(got, expected)
    assert not result.ok(min_cosine=-1.0) and "cosine nan" in result.summary()


def test_shapes_must_match():
    with pytest.raises(ConversionError, match="cannot be compared"):
        compare_logits(logits(shape=(2, 5, 12)), logits())


def test_one_comparison_per_kind_of_input():
    text = compare_logits(logits(), logits()).comparisons[0]
    image = LogitComparison("image", 4, 11, 0.5, 0.9, 0.5)
    result = Parity((text, image))
    assert result.positions == 14 and result.cosine == min(text.cosine, 0.9)
    assert all(f.startswith(("text: ", "image: ")) for f in result.failures())
    assert "  image: 4 positions x 11 logits compared" in result.summary()


def test_cli_parity_prints_fail_and_exits_1(tmp_path, parallel, capsys):
    from specbridge.cli import main
    from tests.support import save_tiny

    hf = save_tiny("llama", tmp_path / "hf")
    assert main(["parity", str(hf), "--seq-len", "6", "--min-cosine", "1.5"]) == 1
    failed = capsys.readouterr().out
    assert failed.startswith("parity: FAIL (cosine ") and "< 1.5" in failed and "12 positions x" in failed
