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


def readme_own_model_example(conv, hf, out):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config, model_args = conv.megatron_config()
    spec = get_gpt_layer_local_spec(config.num_moe_experts, qk_layernorm=config.qk_layernorm,
                                    normalization=config.normalization)
    model = GPTModel(config=config, transformer_layer_spec=spec, **model_args)
    conv.import_weights([model], hf)
    conv.export_weights([model], out, overwrite=True)
    return model


def test_readme_api_example(tmp_path, parallel):
    hf = save_tiny("qwen3", tmp_path / "hf_checkpoint")
    for _ in range(2):
        chunks = readme_example(hf, tmp_path / "hf_out")
        assert compare_checkpoints(hf, tmp_path / "hf_out").exact
    qkv = dict(chunks[0].named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (2 * (2 * 24 + 24 + 24), 64) and torch.isfinite(qkv).all()
    model = readme_own_model_example(Converter.from_pretrained(hf), hf, tmp_path / "hf_out_mine")
    assert compare_checkpoints(hf, tmp_path / "hf_out_mine").exact
    assert torch.equal(dict(model.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"], qkv)
