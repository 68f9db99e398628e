"""Start-up: a command loads the heavy libraries only when it needs them. `compile` needs neither torch,
megatron-core nor transformers; `explain` reads an HF config (transformers) but builds no model (no
megatron-core). Checked in fresh interpreters (what is imported, never how long it takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron.core", "transformers")


def loaded_after(argv: list[str]) -> dict[str, bool]:
    code = ("import json, sys\nfrom specbridge import cli\nrc = cli.main(%r)\n"
            "print(json.dumps({'rc': rc, **{m: m in sys.modules for m in %r}}))" % (argv, HEAVY))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compile_loads_no_heavy_library(tmp_path):
    loaded = loaded_after(["compile", "llama", "-o", str(tmp_path / "bridge.py")])
    assert loaded == {"rc": 0, "torch": False, "megatron.core": False, "transformers": False}
    assert (tmp_path / "bridge.py").read_text().strip()


def test_explain_builds_no_model(tmp_path):
    from tests.support import tiny_model

    tiny_model("llama").config.save_pretrained(str(tmp_path))
    loaded = loaded_after(["explain", "llama", "--config", str(tmp_path),
                           "decoder.layers.0.self_attention.linear_qkv.weight"])
    assert loaded["rc"] == 0 and loaded["transformers"] and not loaded["megatron.core"]
