"""Faults in several processes: every rank ends with exit status 2 and the error is reported once, as one clean
error naming key, rule and rank (no traceback from any rank), and no partial output is left behind.

What is checked is behaviour, never paths or timings: each rank's own stderr (torchrun's `--redirects`, or ranks
started here without a launcher, so that each rank's exit status is its own), the exact error line, the exit
statuses. Timeouts are hang guards only. torchrun prints its own report of the failure (with a traceback of the
launcher): that is the launcher's, not a rank's; its list of each rank's exit status is read here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from tests.multirank.test_multirank import ROOT, torchrun
from tests.support import save_tiny

HANG_GUARD = 600  # seconds; generous, a guard against hangs only


def _no_output(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.specbridge-*"))


def torchrun_logged(nproc: int, args: list[str], logs: Path):
    """torchrun with every rank's stdout/stderr in files of its own: (result, [stderr of rank 0, 1, ...])."""
    result = torchrun(nproc, ["--log-dir", str(logs), "--redirects", "3", *args], timeout=HANG_GUARD)
    stderr = [next(logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text() for rank in range(nproc)]
    return result, stderr


def launcher_exit_statuses(result) -> tuple[int, list[str]]:
    """From torchrun's failure report: the first failed rank's exit status, and every other rank's."""
    report = result.stderr[result.stderr.index("Root Cause"):]
    root = int(re.search(r"exitcode\s*:\s*(-?\d+)", report).group(1))
    others = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr[:result.stderr.index("Root Cause")])
    return root, others


def assert_ended_cleanly(result, stderr: list[str], error_line: str) -> str:
    """Every rank failed without a traceback; the error was printed once, by rank 0, as one report."""
    assert result.returncode != 0
    assert not [r for r, text in enumerate(stderr) if "Traceback" in text], stderr
    assert [r for r, text in enumerate(stderr) if error_line in text] == [0], stderr
    root, others = launcher_exit_statuses(result)
    assert root == 2 and all(s == "2" for s in others), result.stderr[-3000:]
    return stderr[0]


def test_missing_key_fails_on_every_rank(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "mcore"
    result, stderr = torchrun_logged(2, ["-m", "specbridge", "import", str(hf), str(out), "--tp", "2"],
                                     tmp_path / "logs")
    report = assert_ended_cleanly(result, stderr, "specbridge import: error: failed on rank 0, rank 1:")
    assert report.count("the checkpoint has no tensor 'model.layers.1.mlp.down_proj.weight'") == 1
    assert "rank 0, rank 1: the checkpoint has no tensor" in report and "llama.yaml:" in report
    _no_output(out)


def test_corrupt_shard_read_by_one_rank_ends_every_rank(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf", max_shard_size="100KB", num_hidden_layers=4)
    weight_map = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, set[int]] = {}
    for key, file in weight_map.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        files.setdefault(file, set()).add(int(match.group(1)) if match else -1)
    last_stage_only = next(f for f, layers in sorted(files.items()) if layers <= {2, 3})
    path = hf / last_stage_only
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "back"
    result, stderr = torchrun_logged(2, ["-m", "specbridge", "roundtrip", str(hf), "--pp", "2", "--keep", str(out)],
                                     tmp_path / "logs")
    report = assert_ended_cleanly(result, stderr, "specbridge roundtrip: error: failed on rank 1:")
    assert last_stage_only in report and "rank 1" in report
    assert re.search(r"key 'model\.layers\.[23]\.", report) and "llama.yaml:" in report
    _no_output(out)


# ---------------------------------------------------------------- parallel-size mistakes, before anything is built


def start_ranks(nproc: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    """`python -m specbridge ARGS` as ranks 0..nproc-1 of one world, started here (no launcher ends any of them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ranks = [subprocess.Popen([sys.executable, "-m", "specbridge", *args], cwd=ROOT, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(nproc)]
    results = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=HANG_GUARD)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


def test_tp_without_torchrun_is_one_line(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "specbridge", "import", str(hf), str(tmp_path / "out"), "--tp",
                             "2"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                            text=True, timeout=HANG_GUARD)
    assert result.returncode == 2
    assert _errors(result.stderr) == ["specbridge import: error: --tp 2 needs 2 processes (or a multiple), and "
                                      "this is one: launch it with torchrun --nproc-per-node 2 -m specbridge ..."]
    assert "Traceback" not in result.stderr
    _no_output(tmp_path / "out")


def test_world_size_mistake_exits_2_on_every_rank_and_is_printed_once(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    ranks = start_ranks(2, ["import", str(hf), str(tmp_path / "out"), "--tp", "4"])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr[-2000:] for r in ranks]
    assert _errors(ranks[0].stderr) == ["specbridge import: error: 2 processes do not split into tensor x pipeline "
                                        "parallel groups of --tp 4 x --pp 1 = 4: use a world size that is a "
                                        "multiple of 4"]
    assert _errors(ranks[1].stderr) == [] and not [r for r in ranks if "Traceback" in r.stderr]
    _no_output(tmp_path / "out")


def test_model_size_mistake_exits_2_on_every_rank_and_is_printed_once(tmp_path):
    hf = save_tiny("qwen3_moe", tmp_path / "hf")  # 4 experts, 4 heads
    ranks = start_ranks(2, ["roundtrip", str(hf), "--ep", "2", "--etp", "2"])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr[-2000:] for r in ranks]
    errors = _errors(ranks[0].stderr)
    assert len(errors) == 1 and "--etp 2 x --ep 2 x --pp 1 = 4" in errors[0], ranks[0].stderr[-2000:]
    ranks = start_ranks(3, ["roundtrip", str(hf), "--ep", "3"])
    assert [r.returncode for r in ranks] == [2, 2, 2], [r.stderr[-2000:] for r in ranks]
    errors = _errors(ranks[0].stderr)
    assert len(errors) == 1 and "--ep 3 does not divide num_moe_experts = 4 (mcore.transformer at " in errors[0]
    assert "qwen3_moe.yaml:" in errors[0] and "choose --ep among 1, 2, 4" in errors[0]
    assert not [r for r in ranks[1:] if _errors(r.stderr)] and not [r for r in ranks if "Traceback" in r.stderr]


def test_size_mistake_under_torchrun(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    result, stderr = torchrun_logged(2, ["-m", "specbridge", "roundtrip", str(hf), "--pp", "4"], tmp_path / "logs")
    assert_ended_cleanly(result, stderr, "specbridge roundtrip: error: 2 processes do not split into tensor x "
                                         "pipeline parallel groups of --tp 1 x --pp 4 = 4")


# ---------------------------------------------------------------- a fault found while ranks write in place


def test_diverged_absent_part_written_in_place_fails_on_every_rank(tmp_path):
    """Two data-parallel ranks export in place (`direct_write`); the one that writes layer 2's QKV finds its V no
    longer equal to K: every rank raises it (the other rank naming the failed one) and no output is left."""
    hf = save_tiny("gemma4_dense", tmp_path / "hf")
    out = tmp_path / "run"
    out.mkdir()
    result = torchrun(2, [str(Path(__file__).with_name("absent_worker.py")), str(hf), str(out)], timeout=HANG_GUARD)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in range(2)]
    for error in errors:
        assert re.search(r"part 'v' of 'decoder\.layers\.2\.self_attention\.linear_qkv\.weight' in layer 2 .*"
                         r"max \|difference\| 0\.25", error or ""), errors
    assert sum("failed on rank" in e for e in errors) == 1, errors
    _no_output(out / "hf")
