"""The few collectives the runtime needs beyond megatron-core's groups, all safe in a single process.

`agree(error)` is how a failure on one rank becomes the same clear error on every rank instead of a hang: every
rank calls it at the same point with its own outcome, and all raise if any failed. `shared_staging(target)` gives
all ranks one temporary directory beside `target` that rank 0 later renames into place.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

from ..errors import ConversionError


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


def shared_staging(target: Path) -> Path:
    """One staging directory name beside `target` for all ranks (created by rank 0)."""
    rank, _ = world()
    name = str(target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}") if rank == 0 else None
    name = gather_objects(name)[0]
    staging = Path(name)
    if rank == 0:
        staging.mkdir(parents=True)
    barrier()
    return staging


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def commit_staging(staging: Path, target: Path) -> None:
    """After every rank succeeded: rank 0 renames the staging directory into place; all ranks wait for it."""
    barrier()
    if world()[0] == 0:
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    barrier()


def abandon_staging(staging: Path) -> None:
    """On failure: rank 0 removes the staging directory. No collective here: a rank that failed alone must not
    wait for the others (they end with it, at the next collective or when the launcher stops them)."""
    if world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_output(target: str | Path, overwrite: bool = False):
    """`with staged_output(out) as staging:` every rank writes into `staging`; it becomes `out` only when every
    rank got through the block, and is removed otherwise. A non-empty `out` is refused on every rank first."""
    target = Path(target)
    error = None
    if target.exists() and any(target.iterdir()) and not overwrite:
        error = ConversionError(f"output directory '{target}' exists and is not empty")
    agree(error)
    staging = shared_staging(target)
    try:
        yield staging
    except BaseException:
        abandon_staging(staging)
        raise
    commit_staging(staging, target)
