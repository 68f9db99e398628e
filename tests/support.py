"""Tiny random HF checkpoints for the tests (built with transformers' own classes; see specbridge.demo)."""

from __future__ import annotations

from pathlib import Path

from specbridge.demo import FAMILIES, MOE, TINY, perturb, tiny_model  # noqa: F401


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
