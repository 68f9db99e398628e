"""The attacks of the bad-spec corpus, through `specbridge check`: each ends with exit status 2 and its spanned
diagnostics printed once, never a traceback, a hang or a side effect. Bounded work is proved by the error each
one gets (the bound that refused it), not by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specbridge.cli import main
from tests.dsl.test_bad_specs import CONFIG, CORPUS, expectations

ATTACKS = sorted(p for p in CORPUS.glob("*.yaml")
                 if p.name.startswith(("sec_", "eval_", "yaml_", "expr_too_deep", "architecture_config")))
ROOT = Path(__file__).resolve().parents[2]
PWNED = Path("/tmp/specbridge-pwned")  # what sec_dunder_system_call.yaml and yaml_python_object_tag.yaml try


def config_dir(tmp_path: Path, spec_text: str) -> Path:
    """A config.json for `check`: the file's own `# CONFIG:` (as a llama-type config), else a tiny llama."""
    match = CONFIG.match(spec_text.splitlines()[0])
    config = json.loads(match.group(1)) if match else {"architectures": ["TForCausalLM"], "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return tmp_path


def test_the_corpus_holds_every_attack():
    names = {p.stem for p in ATTACKS}
    for attack in ("sec_dunder_system_call", "sec_dunder_attributes", "sec_recursive_symbols", "eval_huge_numbers",
                   "eval_huge_values", "eval_step_budget", "yaml_billion_laughs", "yaml_python_tag", "yaml_nul_byte",
                   "yaml_deep_nesting", "expr_too_deep"):
        assert attack in names


@pytest.mark.parametrize("path", ATTACKS, ids=[p.stem for p in ATTACKS])
def test_check_refuses_the_attack_cleanly(path: Path, tmp_path, capsys):
    existed = PWNED.exists()
    assert main(["check", str(path), "--config", str(config_dir(tmp_path, path.read_text()))]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "coverage proved" not in captured.out
    heads = [line for line in captured.err.splitlines() if line.startswith(f"{path}:")]
    marked = {line for line, _, _ in expectations(path.read_text())}
    assert heads and {int(h.split(":")[1]) for h in heads} <= marked  # the corpus's diagnostics, each once
    assert len(heads) == len(set(heads))
    assert PWNED.exists() == existed


def test_check_in_a_fresh_process_exits_2_with_one_clean_message(tmp_path):
    """The classic escape and the billion laughs, as a user runs them: exit 2, spanned lines, no traceback."""
    existed = PWNED.exists()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("sec_dunder_system_call.yaml", "yaml_billion_laughs.yaml"):
        spec = CORPUS / name
        done = subprocess.run([sys.executable, "-m", "specbridge", "check", str(spec), "--config",
                               str(config_dir(tmp_path, spec.read_text()))], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert done.stderr.count(f"{spec}:") >= 1 and "error:" in done.stderr
    assert "anchors and aliases" in done.stderr
    assert PWNED.exists() == existed
