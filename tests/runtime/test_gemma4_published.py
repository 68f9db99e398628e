"""Real geometry: the published Gemma 4 configurations (towers included; configs only) have their coverage proved
against both manifests on the meta device — no weights allocated — in one process whose peak memory is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.gemma4_published import PUBLISHED

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, resource, sys, time
import torch, transformers
from specbridge.api import Converter
from specbridge.runtime.parallel import init_parallel
from tests.runtime.gemma4_published import PUBLISHED
init_parallel(tp=1, pp=1, ep=1, seed=0)
out = {}
for name, fields in PUBLISHED.items():
    start = time.perf_counter()
    conv = Converter.from_config(transformers.Gemma4Config(**fields, architectures=["Gemma4ForConditionalGeneration"]))
    with torch.device("meta"):
        chunks = conv.build_model(params_dtype=torch.bfloat16)
    hf, mcore = conv.manifests(chunks)
    plan = conv.check(chunks)
    out[name] = {"mappings": len(plan.mappings), "hf": len(hf.tensors), "mcore": len(mcore.tensors),
                 "sentinels": len(plan.sentinels), "seconds": round(time.perf_counter() - start, 1),
                 "towers": sorted({m.mcore.split(".")[0] for m in plan.mappings if "tower" in m.mcore}),
                 "tower_mappings": sum(1 for m in plan.mappings if m.mcore.split(".")[0] in
                                       ("vision_tower", "embed_vision", "audio_tower", "embed_audio"))}
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def proofs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_coverage_proved_at_real_size(proofs, name):
    proof = proofs[name]
    # the check raised nothing: every tensor of both manifests is covered exactly once (or named by a sentinel)
    assert proof["mcore"] == proof["mappings"] and proof["sentinels"] == 1  # lm_head: tied
    audio = PUBLISHED[name]["audio_config"] is not None
    assert proof["towers"] == (["audio_tower", "vision_tower"] if audio else ["vision_tower"])


def test_real_size_proofs_stay_small(proofs):
    assert proofs["peak_rss_mb"] < 2048, proofs  # the four proofs in one process, nothing allocated
