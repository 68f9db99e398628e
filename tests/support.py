"""Tiny random HF checkpoints for the tests (built with transformers' own classes; see specbridge.demo)."""

from __future__ import annotations

from pathlib import Path

from specbridge.demo import FAMILIES, MOE, TINY, perturb, tiny_model  # noqa: F401


def rewrite_safetensors_header(path: Path, edit) -> None:
    """Let `edit` change a safetensors file's JSON header in place (the data is kept, the header re-padded)."""
    import json

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + n:])


def save_tiny(family: str, directory: Path, max_shard_size: str | None = None, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def random_ids(vocab: int, seq_len: int, batch: int = 2):
    """(ids [batch, seq_len], the generator after drawing them): the tokens a multi-rank run and its single-rank
    reference both feed; the generator then draws the same images / audio for both."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator), generator
