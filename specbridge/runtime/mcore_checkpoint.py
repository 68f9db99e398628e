"""Megatron distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format), the format Megatron
training loads.

`save` writes every rank's shards at once into a staging directory that rank 0 renames into place after all
ranks are done (no half-written checkpoint). Beside the shards it writes `specbridge.json` (spec, architecture,
HF format, the HF config) so that `load` can rebuild the model at any TP/PP/EP and reshard through
megatron-core's own loader.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConversionError
from . import collectives

METADATA = "specbridge.json"


def _sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{k}": chunk.sharded_state_dict() for k, chunk in enumerate(chunks)}


def save(chunks, target: str | Path, metadata: dict, overwrite: bool = False) -> Path:
    from megatron.core import dist_checkpointing

    with collectives.staged_output(target, overwrite) as staging:
        dist_checkpointing.save(_sharded_state_dict(chunks), str(staging))
        if collectives.world()[0] == 0:
            (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return Path(target)


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA
    if not path.exists():
        raise ConversionError(f"'{directory}' is not a specbridge Megatron checkpoint (no {METADATA})")
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
            raise ConversionError(f"the Megatron checkpoint '{directory}' lacks {missing[:5]}")
