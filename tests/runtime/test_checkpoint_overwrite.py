"""Outputs are never lost: --overwrite replaces only an earlier output of specbridge, atomically; a run killed
while megatron-core's writer processes are saving leaves the previous output intact and no process behind; the
next run into the same target cleans up after it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specbridge.cli import main
from specbridge.runtime import collectives
from tests.support import save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_tiny("qwen3", tmp_path_factory.mktemp("overwrite") / "hf")


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_overwrite_replaces_an_earlier_output(hf, tmp_path, parallel):
    out = tmp_path / "out"
    assert main(["import", str(hf), str(out)]) == 0
    first = digest(out)
    assert main(["import", str(hf), str(out), "--overwrite"]) == 0
    assert digest(out).keys() == first.keys() and siblings(out) == []
    assert main(["export", str(out), str(tmp_path / "hf_out")]) == 0
    assert main(["export", str(out), str(tmp_path / "hf_out"), "--overwrite"]) == 0
    assert siblings(tmp_path / "hf_out") == []


def test_input_never_touched(hf, tmp_path, parallel):
    before = digest(hf)
    assert main(["import", str(hf), str(hf), "--overwrite"]) == 2
    assert main(["import", str(hf), str(hf.parent), "--overwrite"]) == 2
    assert digest(hf) == before


def test_stale_staging_removed_and_set_aside_output_restored(hf, tmp_path, parallel, capsys):
    out = tmp_path / "out"
    assert main(["import", str(hf), str(out)]) == 0
    kept = digest(out)
    dead = 2 ** 22 + 12345  # above any pid this machine hands out (pid_max is at most 2**22)
    host = collectives._host()
    stale = tmp_path / f".out.specbridge-tmp-{host}-{dead}-0123abcd"
    stale.mkdir()
    (stale / "half-written").write_text("x")
    aside = tmp_path / f".out.specbridge-old-{host}-{dead}-89abcdef"
    out.rename(aside)  # as if killed between renaming the old output aside and the new one in
    capsys.readouterr()
    assert main(["import", str(hf), str(out)]) == 2  # the restored output is there again: --overwrite needed
    err = capsys.readouterr().err
    assert "restored" in err and "removed" in err and "pass --overwrite" in err
    assert digest(out) == kept and siblings(out) == []


def test_foreign_staging_of_a_running_process_is_left(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.specbridge-tmp-{collectives._host()}-{os.getpid()}-0123abcd"
    live.mkdir()
    assert collectives.clean_stale(out) == [] and live.exists()


BLOCKING_RUN = """
import sys, time
from specbridge.runtime import mcore_checkpoint

def blocked(*args, **kwargs):  # runs on a writer thread of the import
    open(sys.argv[1], "w").close()
    time.sleep(3600)

mcore_checkpoint._write_bucket = blocked
from specbridge.cli import main
sys.exit(main(sys.argv[2:]))
"""


def alive_in_session(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,comm="], capture_output=True, text=True, check=True)
    rows = [line.split(None, 3) for line in ps.stdout.splitlines()]
    return [" ".join(r) for r in rows if len(r) >= 3 and r[1] == str(sid) and not r[2].startswith("Z")]


def wait_for(condition, limit: float = 600.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_kill_mid_save_leaves_no_orphan_and_the_old_output(hf, tmp_path, parallel, capsys):
    out = tmp_path / "out"
    assert main(["import", str(hf), str(out)]) == 0
    kept = digest(out)
    flag = tmp_path / "writer-started"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-c", BLOCKING_RUN, str(flag), "import", str(hf), str(out),
                            "--overwrite"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: flag.exists() or run.poll() is not None), "the writer never started"
        assert run.poll() is None  # blocked inside the writer (a thread of the import process)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert wait_for(lambda: not alive_in_session(run.pid), 60), alive_in_session(run.pid)
    finally:  # whatever the outcome, nothing of this run survives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert digest(out) == kept
    assert [n for n in siblings(out) if "-tmp-" in n]  # the killed run's staging, left behind
    capsys.readouterr()
    assert main(["import", str(hf), str(out), "--overwrite"]) == 0
    assert "left by an interrupted run" in capsys.readouterr().err and siblings(out) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs the right to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_one_clean_error(hf, small_disk, tmp_path, parallel, capsys):
    capsys.readouterr()
    assert main(["import", str(hf), str(small_disk / "mcore")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("specbridge import: error: ")
    assert "writing the Megatron checkpoint failed" in err and list(small_disk.iterdir()) == []
    assert main(["import", str(hf), str(tmp_path / "mcore")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "mcore"), str(small_disk / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("specbridge export: error: ")
    assert "No space left" in err and list(small_disk.iterdir()) == []
