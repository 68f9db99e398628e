"""Tiny random HF checkpoints for the tests (built with transformers' own classes; see specbridge.demo)."""

from __future__ import annotations

from pathlib import Path

from specbridge.demo import FAMILIES, MOE, TINY, perturb, tiny_model  # noqa: F401


def save_tiny(family: str, directory: Path, max_shard_size: str | None = None, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory
