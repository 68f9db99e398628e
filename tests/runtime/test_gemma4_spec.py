"""The gemma4 spec beyond the shared round-trip/parity table: the vision-language class's text part with the same
spec, wrong-class loading caught, K=V absent projections checked on export, and the CLI."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

from specbridge.api import Converter
from specbridge.cli import main
from specbridge.errors import ConversionError
from specbridge.runtime.safetensors_io import CheckpointReader
from specbridge.verify import hf_model, parity, roundtrip
from tests.support import save_tiny


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return save_tiny("gemma4_moe", tmp_path_factory.mktemp("g4") / "causal")


@pytest.fixture(scope="module")
def conditional(causal, tmp_path_factory):
    """The same text weights saved as Gemma4ForConditionalGeneration (keys under model.language_model.)."""
    text = transformers.AutoConfig.from_pretrained(str(causal))
    config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None,
                                       architectures=["Gemma4ForConditionalGeneration"])
    out = tmp_path_factory.mktemp("g4") / "conditional"
    out.mkdir()
    config.save_pretrained(str(out))
    reader = CheckpointReader(causal)
    tensors = {k.replace("model.", "model.language_model.", 1): reader.get(k) for k in reader.keys()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_conditional_generation_text_part_uses_the_same_spec(conditional, parallel):
    conv = Converter.from_pretrained(conditional)
    assert conv.plan.spec == "gemma4" and conv.plan.prefix == "model.language_model."
    conv.check()
    assert roundtrip(conditional).exact
    result = parity(conditional, seq_len=12)
    assert result.ok(atol=1e-4), result


def test_wrong_class_is_caught(conditional):
    # transformers returns a randomly initialised model with only a warning: the loading info must be checked
    with pytest.raises(ConversionError, match="did not load the checkpoint cleanly"):
        hf_model(conditional, "Gemma4ForCausalLM")


def test_k_eq_v_has_no_v_proj_and_export_asserts_v_equals_k(causal, tmp_path, parallel):
    assert not any("layers.2.self_attn.v_proj" in k for k in CheckpointReader(causal).keys())
    conv = Converter.from_pretrained(causal)
    chunks = conv.build_model()
    conv.import_weights(chunks, causal)
    qkv = dict(chunks[0].named_parameters())["decoder.layers.2.self_attention.linear_qkv.weight"]
    rows = qkv.view(1, 4 * 32 + 32 + 32, 64)  # full layer: 1 group of [4 q heads | k | v], head_dim 32
    assert torch.equal(rows[:, 160:], rows[:, 128:160])  # import filled V with the raw K
    with torch.no_grad():
        rows[0, 170, 3] += 0.25
    with pytest.raises(ConversionError, match=r"layer 2.*max \|difference\| 0.25"):
        conv.export_weights(chunks, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    conv.export_weights(chunks, tmp_path / "dropped", check_absent=False)
    assert CheckpointReader(tmp_path / "dropped").keys() == CheckpointReader(causal).keys()
    exported, original = ({k: v for k, v in transformers.AutoConfig.from_pretrained(str(d)).to_dict().items()
                           if k != "_name_or_path"} for d in (tmp_path / "dropped", causal))
    assert exported == original  # layer_types, rope_parameters per type, window, global head geometry


def test_cli_roundtrip_and_parity(causal, parallel, capsys):
    assert main(["roundtrip", str(causal)]) == 0
    assert main(["parity", str(causal), "--atol", "1e-4", "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "bit-exact" in out and "top-1 agreement 100.00%" in out
