"""Megatron-LM's own loader is the test of `specbridge import`: a GPT model built the way Megatron-LM builds it,
from the model arguments in specbridge's checkpoint (`--use-checkpoint-args`), loaded with
`megatron.training.checkpointing.load_checkpoint` (fine-tune: no optimizer, no RNG), gives transformers' logits.

Needs megatron-core >= 0.19 (its wheel ships `megatron.training`): the project's second test leg. The loader runs
in a subprocess (`megatron_lm_worker.py`), one rank or two under torchrun (gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from specbridge.cli import main
from tests.multirank.test_multirank import torchrun
from tests.support import save_tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                                reason="megatron.training ships with megatron-core >= 0.19")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("megatron_lm_worker.py")


def not_carried_args(ckpt: Path) -> list[str]:
    """The model arguments Megatron-LM does not take from a checkpoint's args (a user passes them), read from the
    args specbridge wrote."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    args = load_common_state_dict(str(ckpt / "release"))["args"]
    return ["--norm-epsilon", repr(args.norm_epsilon)] + (["--qk-layernorm"] if args.qk_layernorm else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the worker builds Megatron-LM's `--transformer-impl local` model: a dense one loads the TE keys written by
# default (their extra `_extra_state` entries are not asked for); a MoE one needs the local spec's norm keys
LAYER_SPEC = {"llama": [], "qwen3_moe": ["--layer-spec", "local"]}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_lm_loads_specbridge_checkpoint(family, tp, tmp_path, parallel):
    hf = save_tiny(family, tmp_path / "hf")
    assert main(["import", str(hf), str(tmp_path / "mcore"), *LAYER_SPEC[family]]) == 0
    result = tmp_path / "result.json"
    argv = [str(WORKER), str(hf), str(tmp_path / "mcore"), str(result), *not_carried_args(tmp_path / "mcore"),
            "--tensor-model-parallel-size", str(tp)]
    if tp == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()))
        run = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    else:
        run = torchrun(tp, argv, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(result.read_text())
    assert report["iteration"] == 0 and report["num_layers"] == 3
    assert report["max_abs_diff"] <= 1e-5, report
