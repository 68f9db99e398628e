"""NaN payloads survive HF -> Megatron -> HF bit for bit, also through a model of a wider dtype (the CLI's
`import` builds an fp32 model for a bfloat16 checkpoint): the runtime's one dtype conversion keeps them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from specbridge.api import Converter
from specbridge.verify import compare_checkpoints
from tests.compiler.test_ops import crafted, same_bits
from tests.support import tiny_model

KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_payloads_round_trip_through_an_fp32_model(dtype, tmp_path, parallel):
    model = tiny_model("llama").to(dtype)
    model.save_pretrained(tmp_path / "hf")
    (shard,) = (tmp_path / "hf").glob("*.safetensors")
    state = load_file(shard)
    nans = crafted(dtype)
    state[KEY].view(-1)[:len(nans)] = nans
    save_file(state, shard, metadata={"format": "pt"})

    conv = Converter.from_pretrained(tmp_path / "hf")
    chunks = conv.build_model(params_dtype=torch.float32)
    conv.import_weights(chunks, tmp_path / "hf")
    conv.export_weights(chunks, tmp_path / "out", dtype=dtype)

    back = load_file(next((tmp_path / "out").glob("*.safetensors")))[KEY]
    assert same_bits(back.view(-1)[:len(nans)], nans)
    assert compare_checkpoints(tmp_path / "hf", tmp_path / "out").exact
