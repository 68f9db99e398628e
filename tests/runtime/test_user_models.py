"""Conversion into and out of models the user built with megatron-core's own spec functions: the runtime names
their tensors through their sharded state dicts (`naming.checkpoint_names`), whatever modules hold them."""

from __future__ import annotations

import pytest
import torch

from specbridge.api import Converter
from specbridge.runtime.naming import checkpoint_names, local_to_global
from specbridge.verify import compare_checkpoints, hf_model, megatron_logits
from tests.support import random_ids, save_tiny
from tests.user_models import user_model


@pytest.mark.parametrize("family", ["llama", "qwen3_moe_mixed"])
def test_import_into_a_model_built_with_megatron_spec_functions(family, tmp_path, parallel):
    hf = save_tiny(family, tmp_path / "hf")
    conv = Converter.from_pretrained(hf)
    model = user_model(conv, params_dtype=torch.float32)
    conv.import_weights([model], hf)
    ids, _ = random_ids(conv.plan.model_kwargs()["vocab_size"], 10)
    got = megatron_logits(model, ids)[..., :conv.plan.model_kwargs()["vocab_size"]]
    with torch.no_grad():
        expected = hf_model(hf, conv.plan.architecture)(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    conv.export_weights([model], tmp_path / "out")
    assert compare_checkpoints(hf, tmp_path / "out").exact


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "qwen3_moe_mixed"])
def test_sharded_state_dict_names_equal_module_tree_names(family, tmp_path, parallel):
    """On the local spec both namings agree (specbridge's own models keep the module tree's)."""
    conv = Converter.from_pretrained(save_tiny(family, tmp_path / "hf"))
    (chunk,) = conv.build_model(device="meta")
    assert checkpoint_names(chunk) == local_to_global(chunk)
