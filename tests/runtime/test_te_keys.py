"""`specbridge import` writes the keys a TransformerEngine layer-spec model asks for, and the runtime converts into
and out of such a model. TE is not installed here: the TE-spec model is megatron-core's own (its TE layer spec
functions, its TE wrappers' `sharded_state_dict`, TEGroupedMLP) on a stand-in for TE's leaf modules that names
tensors only (`tests/te_standin.py`), in a subprocess (megatron-core binds TE when it is imported). Such a model
cannot run a forward; its logits are checked on a GPU by `scripts/te_check.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specbridge.cli import main
from specbridge.verify import compare_checkpoints
from tests.multirank.test_multirank import torchrun
from tests.support import save_tiny

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("user_model_worker.py")


def run_worker(tp: int, argv: list[str]) -> subprocess.CompletedProcess:
    if tp > 1:
        return torchrun(tp, [str(WORKER), *argv, "--tp", str(tp)], timeout=900)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(WORKER), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def reports(out: Path, tp: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp)]


@pytest.mark.parametrize("family, grouped, tp", [("llama", False, 1), ("qwen3_moe", True, 1),
                                                 ("qwen3_moe_mixed", False, 2)])
def test_te_spec_model_loads_the_checkpoint_and_converts(family, grouped, tp, tmp_path):
    hf = save_tiny(family, tmp_path / "hf")
    assert main(["import", str(hf), str(tmp_path / "mcore")]) == 0  # TE keys by default, written at TP1
    out = tmp_path / "out"
    out.mkdir()
    run = run_worker(tp, [str(hf), str(out), "--te", "--mcore", str(tmp_path / "mcore")]
                     + (["--grouped"] if grouped else []))
    assert run.returncode == 0, run.stderr[-4000:]
    for report in reports(out, tp):
        assert "TELayerNormColumnParallelLinear" in report["modules"]
        assert ("TEGroupedMLP" in report["modules"]) == grouped
        # every key the TE model asks for is in the checkpoint with its global shape, and nothing else is there
        assert report["missing"] == [] and report["wrong_shape"] == [] and report["unasked"] == []
        assert report["load_missing"] == [] and report["differ"] == [] and report["tensors"] > 0
        assert report["extra_states_loaded"] > 0  # TE's set_extra_state got the written "no FP8" states
    assert compare_checkpoints(hf, out / "hf").exact  # export from the TE model, bit for bit


def test_local_spec_user_model_tp2(tmp_path):
    hf = save_tiny("qwen3_moe", tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    run = run_worker(2, [str(hf), str(out)])
    assert run.returncode == 0, run.stderr[-4000:]
    last = reports(out, 2)
    assert all(r["max_abs_diff"] <= 1e-5 and r["same_argmax"] for r in last), last
    assert compare_checkpoints(hf, out / "hf").exact


def test_te_keys_need_a_gpt_model(tmp_path, parallel, capsys):
    hf = save_tiny("gemma4_dense", tmp_path / "hf")
    assert main(["import", str(hf), str(tmp_path / "mcore"), "--layer-spec", "te"]) == 2
    assert "no TransformerEngine layer spec" in capsys.readouterr().err and not (tmp_path / "mcore").exists()


def test_te_keys_refused_for_multi_latent_attention(tmp_path, parallel, capsys):
    hf = save_tiny("deepseek_v3", tmp_path / "hf")
    assert main(["import", str(hf), str(tmp_path / "mcore"), "--layer-spec", "te"]) == 2
    assert "multi-latent attention" in capsys.readouterr().err
