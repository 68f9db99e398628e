"""Start-up of the command line: `--help` and a wrong path answer without importing torch, megatron-core or
transformers; a command's output carries none of the dependencies' warnings the user cannot act on, unless
`--verbose`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "transformers")
PROBE = """
import json, sys
from specbridge.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted({m.split('.')[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY,)


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["check", "--help"], 0), (["roundtrip", "/nonexistent/hf"], 2),
    (["check", "llama", "--config", "/nonexistent/config.json"], 2), (["export", "/nonexistent/mcore", "out"], 2),
    (["compile", "/nonexistent/spec.yaml", "-o", "bridge.py"], 2), (["import", "/nonexistent", "out"], 2),
])
def test_help_and_wrong_paths_import_nothing_heavy(argv, code, tmp_path):
    done = run("-c", PROBE, *argv, cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"code": code, "heavy": []}, done.stderr
    if code == 2:
        assert "/nonexistent" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}))
    return directory


def test_a_command_prints_no_dependency_warnings(tiny_config):
    done = run("-m", "specbridge", "check", "llama", "--config", str(tiny_config / "config.json"))
    assert done.returncode == 0 and "coverage proved" in done.stdout, done.stderr
    assert "Transformer Engine" not in done.stderr and "Apex" not in done.stderr
    assert "warn" not in done.stderr.lower(), done.stderr


def test_verbose_keeps_them(tiny_config):
    done = run("-m", "specbridge", "check", "llama", "--config", str(tiny_config / "config.json"), "--verbose")
    assert done.returncode == 0, done.stderr
    assert "Apex is not installed" in done.stderr


def test_the_filters_silence_megatron_only():
    from specbridge.cli import _quiet_dependencies

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_dependencies(verbose=False)
        warnings.warn_explicit("Apex is not installed", UserWarning, "backends.py", 1, module="megatron.core.x")
        warnings.warn_explicit("a user's own warning", UserWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in seen] == ["a user's own warning"]


def test_compile_loads_no_heavy_library(tmp_path):
    done = run("-c", PROBE, "compile", "llama", "-o", str(tmp_path / "bridge.py"), cwd=tmp_path)
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "heavy": []}, done.stderr
    assert (tmp_path / "bridge.py").read_text().strip()


def test_explain_builds_no_model(tiny_config, tmp_path):
    """`explain` reads the HF config (transformers) but builds no model (no megatron-core)."""
    probe = PROBE.replace("{m.split('.')[0] for m in sys.modules}", "set(sys.modules)").replace(
        repr(HEAVY), repr(("torch", "megatron.core", "transformers")))
    done = run("-c", probe, "explain", "llama", "--config", str(tiny_config),
               "decoder.layers.0.self_attention.linear_qkv.weight", cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0 and "megatron.core" not in result["heavy"], done.stderr


@pytest.mark.parametrize("family", ["llama", "gemma4_dense"])
def test_export_builds_no_model_and_loads_no_transformers(family, tmp_path):
    """`export` reads the checkpoint's tensors itself and compiles its plan from the config reads the import
    recorded: neither megatron-core, transformers nor torch.distributed.checkpoint is imported. Without the
    record (an earlier checkpoint), transformers' config is read and the output is the same, byte for byte."""
    from tests.support import save_tiny

    hf, mcore = save_tiny(family, tmp_path / "hf"), tmp_path / "mcore"
    assert run("-m", "specbridge", "import", str(hf), str(mcore)).returncode == 0
    probe = PROBE.replace("{m.split('.')[0] for m in sys.modules}", "set(sys.modules)").replace(
        repr(HEAVY), repr(("torch", "megatron.core", "transformers", "torch.distributed.checkpoint")))
    done = run("-c", probe, "export", str(mcore), str(tmp_path / "back"), cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0 and result["heavy"] == ["torch"], (result, done.stderr)
    meta_file = mcore / "specbridge.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "config_reads"}))
    done = run("-c", probe, "export", str(mcore), str(tmp_path / "plain"), cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0 and "transformers" in result["heavy"], (result, done.stderr)
    written = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert all((tmp_path / "back" / n).read_bytes() == (tmp_path / "plain" / n).read_bytes() for n in written)


LAZY_MODELS = """
import json, sys
if sys.argv[1] == "specbridge":
    from specbridge.api import _auto_config
    _auto_config()
else:
    from transformers import AutoConfig
from transformers.utils import import_utils
models = sys.modules["transformers.models"]
print(json.dumps({"all": sorted(models.__all__), "modules": sorted(models._modules),
                  "classes": sorted(models._class_to_module.items()),
                  "missing": sorted((k, sorted(map(str, v))) for k, v in models._object_missing_backend.items()),
                  "scanned": import_utils.create_import_structure_from_path.cache_info().misses}))
"""


def test_transformers_models_scanned_once_and_its_own():
    """The config loader imports `transformers.models` without transformers' second scan of its models directory,
    and the lazy module it gets is the one transformers builds itself (every name, module and backend)."""
    ours, theirs = (json.loads(run("-c", LAZY_MODELS, who).stdout) for who in ("specbridge", "transformers"))
    scanned = ours.pop("scanned"), theirs.pop("scanned")
    assert ours == theirs and ours["classes"]
    assert 2 * scanned[0] <= scanned[1] + 2, scanned  # one scan of the folders instead of two


def test_the_program_runs_with_the_collector_settled(tiny_config):
    """`python -m specbridge` (the console script's `run`): the collector is off while the libraries load and back
    on for the command's own garbage once they are in."""
    probe = """
import gc, sys
from specbridge import cli
seen = []
loaded = cli._libraries_loaded
cli._libraries_loaded = lambda: (seen.append(gc.isenabled()), loaded(), seen.append(gc.isenabled()))
sys.argv = ["specbridge", *sys.argv[1:]]
try:
    cli.run()
finally:
    print(seen, gc.get_freeze_count() > 100000, file=sys.stderr)
"""
    done = run("-c", probe, "check", "llama", "--config", str(tiny_config / "config.json"))
    assert done.returncode == 0 and "coverage proved" in done.stdout, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[False, True] True", done.stderr


def test_each_architecture_finds_its_one_spec_parsing_only_candidates(monkeypatch):
    """Every architecture a built-in spec declares is served by exactly that spec, and finding it parses only the
    specs that name it (or could inherit it through `extends`), not all of them."""
    from specbridge import api, compiler

    served = {}
    for name, path in api.builtin_specs().items():
        for arch in compiler.load(path).architectures:
            served.setdefault(arch.name, []).append(name)
    assert served and all(len(names) == 1 for names in served.values()), served
    loads = []
    real_load = compiler.load
    monkeypatch.setattr(compiler, "load", lambda path, *a, **k: loads.append(Path(path).stem) or real_load(path, *a, **k))
    for arch, (name,) in served.items():
        loads.clear()
        assert api.spec_for_architecture(arch).stem == name
        assert loads[-1] == name and len(loads) < len(api.builtin_specs()) / 2, (arch, loads)
    with pytest.raises(api.UsageError, match="no built-in spec serves architecture 'NoSuchForCausalLM'"):
        api.spec_for_architecture("NoSuchForCausalLM")
