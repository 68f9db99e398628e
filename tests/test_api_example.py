"""The README's API example, run as written on a tiny checkpoint, twice in the same place (the second run replaces
the first one's output)."""

import torch

from specbridge.api import Converter
from specbridge.verify import compare_checkpoints
from tests.support import save_tiny


def readme_example(hf, out):
    conv = Converter.from_pretrained(hf)
    conv.check()
    chunks = conv.build_model()
    conv.import_weights(chunks, hf)
    conv.export_weights(chunks, out, overwrite=True)
    return chunks


def test_readme_api_example(tmp_path, parallel):
    hf = save_tiny("qwen3", tmp_path / "hf_checkpoint")
    for _ in range(2):
        chunks = readme_example(hf, tmp_path / "hf_out")
        assert compare_checkpoints(hf, tmp_path / "hf_out").exact
    qkv = dict(chunks[0].named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (2 * (2 * 24 + 24 + 24), 64) and torch.isfinite(qkv).all()
