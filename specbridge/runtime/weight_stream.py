"""Streaming weight sync: HF-named tensors of a Megatron model, in bounded buckets, without touching disk.

`iter_hf_weights` drives the exporter (`exporter.export_steps`) with a `BucketSink` in place of the checkpoint
writer, so the tensors are exactly those an export writes (same names, values, dtypes and stacking), and hands
the sink's full buckets to the caller between export groups. Each tensor appears once, on the rank that would
write it (TP groups gather to their first rank, one tensor at a time; expert groups to the EP rank that writes
the group), so the union over ranks is the whole HF checkpoint. A bucket is a list of `(name, tensor)` holding at
most `bucket_bytes`, except that a single tensor larger than the bound comes alone. Tensors that need no
conversion are the model's own memory (read-only views: copy them if the model changes before they are used).
Every rank must consume the generator to the end (the export's collectives run in step on all ranks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..compiler import ir
from ..errors import ConversionError, UsageError
from . import collector, exporter
from .parallel import Topology

Bucket = list[tuple[str, torch.Tensor]]


class BucketSink:
    """An exporter sink (`add`, `add_slice`, `open_stacks`) that groups tensors into buckets of bounded size."""

    def __init__(self, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise UsageError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self._bucket: Bucket = []
        self._bytes = 0
        self._ready: list[Bucket] = []
        self._stacks: dict[str, tuple[torch.Tensor, set[int]]] = {}
        self._seen: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor, owned: bool = False) -> None:
        if key in self._seen:
            raise ConversionError(f"tensor '{key}' produced twice", key=key)
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._bucket and self._bytes + nbytes > self.bucket_bytes:
            self._close()
        self._bucket.append((key, tensor.detach()))
        self._bytes += nbytes

    def add_slice(self, key: str, index: int, length: int, tensor: torch.Tensor) -> bool:
        """Slice `index` of the stacked tensor `key`, assembled in one preallocated tensor; True once complete."""
        if key not in self._stacks:
            self._stacks[key] = (tensor.new_empty((length, *tensor.shape)), set())
        stack, filled = self._stacks[key]
        stack[index].copy_(tensor)
        filled.add(index)
        if len(filled) < length:
            return False
        del self._stacks[key]
        self.add(key, stack, owned=True)
        return True

    def open_stacks(self) -> list[str]:
        return sorted(self._stacks)

    def _close(self) -> None:
        self._ready.append(self._bucket)
        self._bucket, self._bytes = [], 0

    def take(self, final: bool = False) -> list[Bucket]:
        """The buckets completed so far (with `final`, the last partial one too)."""
        if final and self._bucket:
            self._close()
        ready, self._ready = self._ready, []
        return ready


def iter_hf_weights(chunks, plan: ir.Plan, topology: Topology, bucket_bytes: int, hf_dtype: torch.dtype | None = None,
                    check_absent: bool = True) -> Iterator[Bucket]:
    """Buckets of (HF name, tensor) for this rank's share of the model (see the module docstring); the bound is
    checked at the call, the export runs as the buckets are consumed."""
    sink = BucketSink(bucket_bytes)
    steps = exporter.export_steps(chunks, plan, sink, topology, hf_dtype=hf_dtype, check_absent=check_absent)
    return _drain(steps, sink)


def _drain(steps, sink: BucketSink) -> Iterator[Bucket]:
    """The sink's buckets after each export step; the collector is paused while a step runs, not while the
    caller has the buckets."""
    done = False
    while not done:
        with collector.paused():
            done = next(steps, _END) is _END
            ready = sink.take(final=done)
        yield from ready


_END = object()
