"""LoRA under torchrun (gloo): importing an HF checkpoint with a PEFT adapter at TP2 / EP2 / PP2 gives the single-rank
logits and the same adapter and merged files as a single rank, and the Megatron checkpoint written there (adapter
weights sharded along their own TP axes) loads at TP1 to the same adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specbridge.api import Converter
from specbridge.runtime import mcore_checkpoint
from specbridge.runtime.lora import LoraSettings
from specbridge.verify import compare_checkpoints, megatron_logits
from tests.multirank.test_multirank import torchrun
from tests.runtime.test_lora import HF_TARGETS, peft_adapter
from tests.support import save_tiny

WORKER = Path(__file__).with_name("lora_worker.py")
CASES = {  # name: (family, processes, flags)
    "tp2": ("llama", 2, ["--tp", "2"]),
    "ep2": ("qwen3_moe", 2, ["--ep", "2"]),
    "gemma4_tp2": ("gemma4_dense", 2, ["--tp", "2"]),  # K=V full layers: 1 KV group < TP
    "pp2": ("llama", 2, ["--pp", "2"]),  # each stage exports its layers' adapters
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_parallel_matches_single_rank(case, tmp_path, parallel):
    family, nproc, flags = CASES[case]
    hf = save_tiny(family, tmp_path / "hf", num_hidden_layers=4 if family != "gemma4_dense" else 5)
    adapter = peft_adapter(hf, tmp_path / "adapter", HF_TARGETS.get(family, HF_TARGETS["llama"]))

    conv = Converter.from_pretrained(hf)
    chunks = conv.build_model()
    conv.import_weights(chunks, hf)
    settings = conv.import_adapter(chunks, adapter)
    vocab = conv.plan.model_kwargs()["vocab_size"]
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(chunks[0], ids)[..., :vocab]
    conv.export_adapter(chunks, tmp_path / "single_peft", settings)
    conv.export_merged(chunks, tmp_path / "single_merged", settings)

    out = tmp_path / "multi"
    out.mkdir()
    result = torchrun(nproc, [str(WORKER), str(hf), str(adapter), str(out), *flags])
    assert result.returncode == 0, result.stderr[-4000:]
    multi = torch.load(out / "logits.pt")
    assert (multi - logits).abs().max().item() <= 1e-5
    assert torch.equal(multi.argmax(-1), logits.argmax(-1))
    assert compare_checkpoints(tmp_path / "single_peft", out / "peft").exact
    assert compare_checkpoints(adapter, out / "peft").exact
    assert compare_checkpoints(tmp_path / "single_merged", out / "merged").exact

    fresh = conv.build_model()
    recorded = json.loads((out / "mcore" / mcore_checkpoint.METADATA).read_text())  # the worker's own metadata
    restored = conv.restore_adapter(fresh, LoraSettings.from_json(recorded["adapter"]))
    mcore_checkpoint.load(fresh, out / "mcore")
    conv.export_adapter(fresh, tmp_path / "resharded", restored)
    assert compare_checkpoints(adapter, tmp_path / "resharded").exact
