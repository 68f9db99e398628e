"""The few collectives the runtime needs beyond megatron-core's groups, all safe in a single process.

`agree(error)` is how a failure on one rank becomes the same clear error on every rank instead of a hang: every
rank calls it at the same point with its own outcome, and all raise if any failed.

Outputs (HF exports, Megatron checkpoints) are written through `staged_output`: all ranks write into one staging
directory beside the target, which becomes the target only when every rank succeeded. The rules:

- the output is checked first, before any work (`check_output`): never the input nor a directory holding it; an
  existing non-empty directory only with `overwrite`, and only when it holds nothing but what specbridge wrote
  there (the `.specbridge-output.json` it leaves in every output lists those files);
- replacing is atomic: the old output is renamed aside, the new one renamed in, then the old one deleted; a kill at
  any point leaves the old output or the new one in place;
- staging and set-aside directories are named `.{target}.specbridge-{tmp|old}-{host}-{pid}-{id}`; the next run into
  the same target removes those of processes that no longer run (and puts back an old output whose replacement
  never arrived), and says so on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

import torch.distributed as dist

from ..errors import ConversionError, SpecbridgeError, UsageError


def world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_objects(obj) -> list:
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def agree(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (the error names the failing rank(s) and their messages)."""
    rank, _ = world()
    outcomes = gather_objects(None if error is None else (rank, str(error)))
    failed = [o for o in outcomes if o is not None]
    if not failed:
        return
    if error is None or len(failed) > 1:
        ranks_of: dict[str, list[int]] = {}
        for r, msg in failed:
            ranks_of.setdefault(msg, []).append(r)
        lines = [", ".join(f"rank {r}" for r in ranks) + f": {msg}" for msg, ranks in ranks_of.items()]
        error = ConversionError("failed on " + ", ".join(f"rank {r}" for r, _ in failed) + ":\n  "
                                + "\n  ".join(lines))
    error.on_every_rank = True  # every rank raises (rank 0's report names every failure)
    raise error


MARKER = ".specbridge-output.json"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.specbridge-{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _siblings(target: Path) -> list[tuple[Path, str, str, int]]:
    """This tool's staging ('tmp') and set-aside ('old') directories of `target`: (path, kind, host, pid)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.specbridge-(tmp|old)-([A-Za-z0-9]*)-(\d+)-[0-9a-f]{{8}}$")
    if not target.parent.is_dir():
        return []
    found = [(p, pattern.match(p.name)) for p in sorted(target.parent.iterdir())]
    return [(p, m.group(1), m.group(2), int(m.group(3))) for p, m in found if m and p.is_dir()]


def _running(host: str, pid: int) -> bool:
    if host != _host():
        return True  # another machine's process: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | Path) -> list[str]:
    """Remove the staging directories of interrupted runs into `target` (and put back an old output whose
    replacement never arrived). Returns what was done, one line each."""
    target, done = Path(target), []
    for path, kind, host, pid in _siblings(target):
        if _running(host, pid):
            if host != _host():
                done.append(f"left '{path}' (a staging directory of host '{host}')")
            continue
        if kind == "old" and not target.exists():
            path.rename(target)
            done.append(f"restored '{target}' from '{path.name}', set aside by an interrupted run")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed '{path}', left by an interrupted run")
    return done


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


def foreign_files(directory: Path) -> list[str]:
    """Files in `directory` that specbridge did not write there (all of them when it holds no marker)."""
    files = [f for f in _files(directory) if f != MARKER]
    try:
        written = set(json.loads((directory / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return files
    return [f for f in files if f not in written]


def _contains(outer: Path, inner: Path) -> bool:
    return inner.resolve() == outer.resolve() or inner.resolve().is_relative_to(outer.resolve())


def check_output(target: str | Path, overwrite: bool = False, inputs=()) -> None:
    """Refuse, before any work, an output that would destroy an input or something specbridge did not write."""
    target = Path(target)
    for source in inputs:
        if _contains(target, Path(source)):
            raise UsageError(f"the output '{target}' is (or contains) the input '{source}': choose another output "
                             f"directory")
    if target.exists() and not target.is_dir():
        raise UsageError(f"the output '{target}' exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"output directory '{target}' exists and is not empty (pass --overwrite to replace an "
                         f"earlier output of specbridge)")
    foreign = foreign_files(target)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UsageError(f"--overwrite replaces only an earlier output of specbridge, but '{target}' holds files it "
                         f"did not write: {', '.join(foreign[:3])}{more}")


def shared_staging(target: Path) -> Path:
    """One staging directory beside `target` for all ranks (named and created by rank 0)."""
    rank, _ = world()
    name = str(_sibling(target, "tmp")) if rank == 0 else None
    staging = Path(gather_objects(name)[0])
    if rank == 0:
        staging.mkdir(parents=True)
    barrier()
    return staging


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def commit_staging(staging: Path, target: Path) -> None:
    """After every rank succeeded: rank 0 lists what was written (the marker), renames an existing output aside,
    the staging directory into place, then deletes the old output; all ranks wait for it."""
    barrier()
    if world()[0] == 0:
        (staging / MARKER).write_text(json.dumps({"written_by": "specbridge", "files": _files(staging)}, indent=1)
                                      + "\n")
        aside = None
        if target.exists():
            aside = _sibling(target, "old")
            target.rename(aside)
        staging.rename(target)
        if aside is not None:
            shutil.rmtree(aside)
    barrier()


def abandon_staging(staging: Path) -> None:
    """On failure: rank 0 removes the staging directory. No collective here: a rank that failed alone must not
    wait for the others (they end with it, at the next collective or when the launcher stops them)."""
    if world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_output(target: str | Path, overwrite: bool = False, inputs=()):
    """`with staged_output(out) as staging:` every rank writes into `staging`; it becomes `out` only when every
    rank got through the block, and is removed otherwise. The output is checked first (`check_output`) and stale
    staging directories of `out` are cleaned (`clean_stale`)."""
    target = Path(target)
    error = None
    if world()[0] == 0:  # first: an old output set aside by a killed run is put back before it is judged
        try:
            for line in clean_stale(target):
                print(f"specbridge: {line}", file=sys.stderr)
        except OSError as exc:
            error = ConversionError(f"cannot clean the staging directories of '{target}': {exc}")
    barrier()
    try:
        check_output(target, overwrite, inputs)
    except SpecbridgeError as exc:
        error = error or exc
    agree(error)
    staging = shared_staging(target)
    try:
        yield staging
        commit_staging(staging, target)
    except OSError as exc:  # a full disk, a read-only or vanished directory: the user's to fix
        abandon_staging(staging)
        raise ConversionError(f"writing '{target}' failed: {exc}", rank=world()[0]) from None
    except BaseException:
        abandon_staging(staging)
        raise
