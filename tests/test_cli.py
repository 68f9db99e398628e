"""The command line, in process: every command on a tiny checkpoint; errors exit 2 without a traceback."""

import pytest

from specbridge.cli import main
from specbridge.verify import compare_checkpoints
from tests.support import save_tiny


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("cli") / "hf")


def test_check_and_explain(hf, parallel, capsys):
    assert main(["check", "qwen3_moe", "--config", str(hf / "config.json")]) == 0
    assert "coverage proved" in capsys.readouterr().out
    assert main(["explain", "qwen3_moe", "--config", str(hf), "model.layers.2.mlp.experts.gate_up_proj"]) == 0
    out = capsys.readouterr().out
    assert "local_experts.3.linear_fc1.weight" in out and "[3]" in out


def test_roundtrip_and_parity(hf, parallel, capsys):
    assert main(["roundtrip", str(hf)]) == 0
    assert "bit-exact" in capsys.readouterr().out
    assert main(["parity", str(hf), "--atol", "1e-4"]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out


def test_import_export_dist_checkpoint(hf, tmp_path, parallel):
    assert main(["import", str(hf), str(tmp_path / "mcore")]) == 0
    assert (tmp_path / "mcore" / "specbridge.json").exists()
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "back")]) == 0
    assert compare_checkpoints(hf, tmp_path / "back").exact
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "fused"), "--format", "fused"]) == 0
    assert any("gate_up_proj" in k for k in (tmp_path / "fused" / "model.safetensors").read_bytes()[:8000]
               .decode("latin1").split('"'))


def test_errors_exit_2_without_traceback(tmp_path, parallel, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: x\nhf: {architectures: {A: {prefix: ''}}}\nmcore: {model: gpt}\nrules:\n"
                   "  - hf: 'a.{i}.b'\n    mcore: 'c.{i:layer}.d +'\n")
    assert main(["check", str(bad), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:6:" in err and "^" in err and "Traceback" not in err
    assert main(["roundtrip", str(tmp_path / "nowhere")]) == 2
    assert "does not exist or has no config.json" in capsys.readouterr().err


def test_demo_families_listed():
    from specbridge.cli import DEMO_FAMILIES
    from specbridge.demo import FAMILIES

    assert set(DEMO_FAMILIES) == set(FAMILIES)


def test_compile_never_replaces_a_file_unasked(tmp_path, capsys):
    out = tmp_path / "bridge.py"
    out.write_text("# the user's own module\n")
    assert main(["compile", "llama", "-o", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "# the user's own module\n"
    assert main(["compile", "llama", "-o", str(out), "--overwrite"]) == 0
    assert "def plan(" in out.read_text()
    assert main(["compile", "llama", "-o", str(tmp_path / "missing" / "bridge.py")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.py"]
