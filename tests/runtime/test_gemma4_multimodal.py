"""Gemma 4 as published: the multimodal class (vision and audio towers inside the Megatron model) and the E2B/E4B
text features (PLE, KV sharing). Coverage, round trip and parity of every style are in the shared table
(test_roundtrip_parity, families gemma4_*); here: what parity fed, negative controls that must make it fail, the
exported directory loaded back by transformers, and the Megatron side of KV sharing and PLE."""

from __future__ import annotations

import json

import pytest
import torch

from specbridge.api import Converter
from specbridge.cli import main
from specbridge.runtime.models import gemma4_model, sample_inputs
from specbridge.runtime.models.gemma4_attention import StageState
from specbridge.verify import compare_logits, hf_model, parity, pipeline_logits
from tests.support import save_tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("g4mm")
    return {family: save_tiny(family, root / family) for family in ("gemma4_vlm", "gemma4_e2b_vlm")}


def _converted(hf_dir):
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model(params_dtype=torch.float32)
    conv.import_weights(chunks, hf_dir)
    return conv, chunks


def _logits_against_hf(conv, chunks, hf_dir, hf=None):
    """(Megatron logits, HF logits) on the parity inputs (one image and one audio clip per sequence)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    inputs = sample_inputs("gemma4", conv.hf_config, ids, generator)
    got = pipeline_logits(chunks, inputs.ids, 128, inputs.rows)
    hf = hf if hf is not None else hf_model(hf_dir, conv.plan.architecture)
    with torch.no_grad():
        expected = hf(input_ids=inputs.ids, **inputs.hf).logits.float()
    return got, expected


def test_parity_feeds_every_modality(checkpoints, parallel, capsys):
    assert parity(checkpoints["gemma4_vlm"]).modalities == ("text", "image")
    assert main(["parity", str(checkpoints["gemma4_e2b_vlm"]), "--atol", "1e-4"]) == 0
    assert "(inputs: text, image, audio)" in capsys.readouterr().out


def test_causal_only_image_mask_fails_parity(checkpoints, parallel, monkeypatch):
    """26B/31B attend both ways within an image on sliding layers; a causal-only mask is caught."""
    monkeypatch.setattr(gemma4_model.Gemma4Model, "_image_blocks", lambda self, ids: None)
    result = parity(checkpoints["gemma4_vlm"])
    assert not result.ok(atol=1e-4) and result.max_abs_diff > 1e-3, result


@pytest.mark.parametrize(("family", "first", "second"), [
    ("gemma4_vlm", "vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
     "vision_tower.encoder.layers.0.self_attn.k_proj.linear.weight"),
    ("gemma4_e2b_vlm", "audio_tower.layers.0.self_attn.q_proj.linear.weight",
     "audio_tower.layers.0.self_attn.k_proj.linear.weight"),
])
def test_swapped_tower_weight_fails_parity(checkpoints, parallel, family, first, second):
    conv, chunks = _converted(checkpoints[family])
    params = dict(chunks[0].named_parameters())
    with torch.no_grad():
        a = params[first].clone()
        params[first].copy_(params[second])
        params[second].copy_(a)
    result = compare_logits(*_logits_against_hf(conv, chunks, checkpoints[family]))
    assert not result.ok(atol=1e-4) and result.max_abs_diff > 1e-3, result


def test_exported_directory_loads_in_transformers_with_identical_logits(checkpoints, parallel, tmp_path):
    hf_dir = checkpoints["gemma4_e2b_vlm"]
    conv, chunks = _converted(hf_dir)
    conv.export_weights(chunks, tmp_path / "out")
    exported = hf_model(tmp_path / "out", "Gemma4ForConditionalGeneration")  # raises on missing / unexpected keys
    original, reloaded = _logits_against_hf(conv, chunks, hf_dir)[1], _logits_against_hf(conv, chunks, hf_dir,
                                                                                        exported)[1]
    assert torch.equal(original, reloaded)


def test_kv_shared_layers_have_only_queries(checkpoints, parallel):
    conv, chunks = _converted(checkpoints["gemma4_e2b_vlm"])
    names = dict(chunks[0].named_parameters())
    for i in (3, 4, 5):  # the shared tail: queries only, double-wide MLP
        attention = f"decoder.layers.{i}.self_attention."
        assert attention + "linear_q.weight" in names and attention + "linear_qkv.weight" not in names
        assert attention + "k_layernorm.weight" not in names
        assert names[f"decoder.layers.{i}.mlp.linear_fc1.weight"].shape == (2 * 2 * 40, 64)
    assert names["decoder.layers.2.mlp.linear_fc1.weight"].shape == (2 * 40, 64)
    assert names["per_layer_embedding.weight"].shape == (128, 6 * 8)
    keys = conv.plan.hf_keys()
    assert not any(f"layers.{i}.self_attn.{p}" in k for k in keys for i in (3, 4, 5) for p in ("k_", "v_"))


def test_wrong_kv_source_or_per_layer_input_fails_parity(checkpoints, parallel, monkeypatch):
    """Controls for the two E2B/E4B mechanisms: a shared layer reading the *first* non-shared layer of its type,
    or every layer reading its neighbour's per-layer input, is caught by parity."""
    hf_dir = checkpoints["gemma4_e2b_vlm"]

    class FirstWriteWins(dict):
        def __setitem__(self, key, value):
            self.setdefault(key, value)

    original_reset = StageState.reset

    def reset(self):
        original_reset(self)
        self.kv = FirstWriteWins()

    monkeypatch.setattr(StageState, "reset", reset)
    result = parity(hf_dir)
    assert not result.ok(atol=1e-4) and result.max_abs_diff > 1e-3, result
    monkeypatch.setattr(StageState, "reset", original_reset)

    def shifted(self, *args):
        inputs = original_per_layer_inputs(self, *args)
        return torch.roll(inputs, 1, dims=2)

    original_per_layer_inputs = gemma4_model.Gemma4Model._per_layer_inputs
    monkeypatch.setattr(gemma4_model.Gemma4Model, "_per_layer_inputs", shifted)
    result = parity(hf_dir)
    assert not result.ok(atol=1e-4) and result.max_abs_diff > 1e-3, result


def test_demo_runs_the_multimodal_path(parallel, capsys):
    assert main(["demo", "--family", "gemma4_vlm"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "Gemma4ForConditionalGeneration" and report["inputs"] == ["text", "image"]
    assert report["roundtrip_bit_exact"] and report["parity_ok"]
