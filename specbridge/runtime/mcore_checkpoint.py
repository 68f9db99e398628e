"""Megatron distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format), the format Megatron
training loads.

`save` writes every rank's shards at once into a staging directory that rank 0 renames into place after all
ranks are done (no half-written checkpoint). Beside the shards it writes `specbridge.json` (spec, architecture,
HF format, the HF config) so that `load` can rebuild the model at any TP/PP/EP and reshard through
megatron-core's own loader.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

METADATA = "specbridge.json"


def _sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{k}": chunk.sharded_state_dict() for k, chunk in enumerate(chunks)}


def _shared_staging(target: Path) -> Path:
    """One staging directory name for all ranks (rank 0 chooses it)."""
    name = [str(target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def save(chunks, target: str | Path, metadata: dict, overwrite: bool = False) -> Path:
    from megatron.core import dist_checkpointing

    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory '{target}' exists and is not empty")
    staging = _shared_staging(target)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        dist_checkpointing.save(_sharded_state_dict(chunks), str(staging))
        dist.barrier()
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if dist.get_rank() == 0:
        (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    dist.barrier()
    return target


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA
    if not path.exists():
        raise FileNotFoundError(f"'{directory}' is not a specbridge Megatron checkpoint (no {METADATA})")
    return json.loads(path.read_text())


def load(chunks, directory: str | Path) -> None:
    """Fill `chunks` (built at any parallel layout) from the checkpoint, resharding as needed."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(directory))
    states = [state] if len(chunks) == 1 else [state[f"model{k}"] for k in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, states):
        result = chunk.load_state_dict(chunk_state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"the Megatron checkpoint '{directory}' lacks {missing[:5]}")
