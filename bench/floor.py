"""The I/O floor (a worker): read every tensor of a checkpoint once and write the same bytes once, the
figures a converter cannot beat."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .geometry import numel
from .machine import GB, drop_caches


def worker_floor(args) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(args.dir)
    shards = sorted(src.glob("*.safetensors"))
    cold = drop_caches() if args.drop_cache else False
    # safetensors >= 0.6 answers get_tensor with a tensor backed by the file's mmap (nothing read yet): each
    # tensor is materialised by copying it into one reused, pre-faulted buffer, so the floor counts the reading
    # and one copy, not page faults of fresh memory
    largest = max(numel(s) * 2 for s in _shapes(shards))
    buffer = torch.ones(largest, dtype=torch.uint8)
    nbytes, start = 0, time.perf_counter()
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in _in_file_order(path):  # f.keys() is sorted by name: reading in offset order is faster
                t = f.get_tensor(key).reshape(-1).view(torch.uint8)
                buffer[:t.numel()].copy_(t)
                nbytes += t.numel()
                del t
    read_s = time.perf_counter() - start
    del buffer
    if args.read_only:
        return {"loadavg": os.getloadavg(), "bytes": nbytes, "read_s": read_s, "read_cold": cold}
    dst = Path(args.scratch)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    # write: the export writes from memory into the page cache with no sync in between, so does the floor
    # (one sync before the phase, none between shards)
    os.sync()
    write_s = 0.0
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            data = {key: f.get_tensor(key).clone() for key in f.keys()}  # in memory, not mmap-backed (untimed)
        start = time.perf_counter()
        save_file(data, str(dst / path.name), metadata={"format": "pt"})
        write_s += time.perf_counter() - start
        del data
    shutil.rmtree(dst)
    return {"loadavg": os.getloadavg(), "bytes": nbytes, "read_s": read_s, "write_s": write_s, "read_cold": cold,
            "read_GBps": nbytes / GB / read_s, "write_GBps": nbytes / GB / write_s}


def _in_file_order(path: Path) -> list[str]:
    """The tensor names of a safetensors file in the order of their data offsets (from the file's header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def _shapes(shards):
    from safetensors import safe_open

    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield f.get_slice(key).get_shape()
