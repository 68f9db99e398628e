"""The I/O floor (a worker): read every tensor of a checkpoint once into freshly allocated memory and write the
same bytes once, the figures a converter cannot beat."""

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
    # the floor of the issue: every tensor read once into freshly allocated memory, kept as parameters are (their
    # pages first touched by the read, as an import's are); then, for the report, the same read copied into one
    # reused, pre-faulted buffer (what the read costs without the first touch of fresh memory)
    cold = drop_caches() if args.drop_cache else False
    start = time.perf_counter()
    nbytes, kept = read_fresh(shards)
    read_s = time.perf_counter() - start
    del kept
    if args.drop_cache:
        drop_caches()
    # safetensors >= 0.6 answers get_tensor with a tensor backed by the file's mmap (nothing read yet): each
    # tensor is materialised by copying it into the buffer
    largest = max(numel(s) * 2 for s in _shapes(shards))
    buffer = torch.ones(largest, dtype=torch.uint8)
    start = time.perf_counter()
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in _in_file_order(path):  # f.keys() is sorted by name: reading in offset order is faster
                t = f.get_tensor(key).reshape(-1).view(torch.uint8)
                buffer[:t.numel()].copy_(t)
                del t
    reused_s = time.perf_counter() - start
    del buffer
    read = {"loadavg": os.getloadavg(), "bytes": nbytes, "read_s": read_s, "read_reused_s": reused_s,
            "read_cold": cold}
    if args.read_only:
        return read
    dst = Path(args.scratch)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    # write: the export writes from memory into the page cache with no sync in between, so does the floor
    # (one sync before the phase, none between shards)
    os.sync()
    buffered_s = direct_s = 0.0
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            data = {key: f.get_tensor(key).clone() for key in f.keys()}  # in memory, not mmap-backed (untimed)
        start = time.perf_counter()
        save_file(data, str(dst / path.name), metadata={"format": "pt"})
        buffered_s += time.perf_counter() - start
        start = time.perf_counter()
        write_direct(dst / f"direct-{path.name}", data, {"format": "pt"})
        direct_s += time.perf_counter() - start
        del data
    shutil.rmtree(dst)
    write_s = min(buffered_s, direct_s)
    return {**read, "loadavg": os.getloadavg(), "write_s": write_s, "write_buffered_s": buffered_s,
            "write_direct_s": direct_s, "read_GBps": nbytes / GB / read_s, "write_GBps": nbytes / GB / write_s}


def read_fresh(shards) -> tuple[int, list]:
    """Every tensor of the safetensors files `shards` read once, one read() per tensor straight into a freshly
    allocated tensor, on one thread: (bytes read, the tensors). The tensors are kept, as parameters are: a dropped
    tensor's memory would be reused, already faulted in."""
    import torch

    from specbridge.runtime.direct_read import read_header

    total, kept = 0, []
    for path in shards:
        with open(path, "rb", buffering=0) as f:
            for entry in read_header(path).values():
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                kept.append(tensor)
                if tensor.numel():
                    f.seek(entry.offset)
                    total += f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return total, kept


_CHUNK, _ALIGN = 16 << 20, 4096


def write_direct(path: Path, tensors: dict, metadata: dict) -> None:
    """The bytes of the file (header laid out as specbridge's writer does, the same bytes `save_file` writes but
    for the JSON's key order), written past the page cache (O_DIRECT) through one reused, page-aligned buffer,
    on one thread: the other way to write a file once, and the faster one where fresh page-cache pages are dear (a
    VM whose host takes back idle memory)."""
    import mmap

    import torch

    from specbridge.runtime.safetensors_io import layout_file

    header, _, _ = layout_file([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
    streams = [torch.frombuffer(bytearray(header), dtype=torch.uint8)]
    streams += [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors.values() if t.numel()]
    buffer = mmap.mmap(-1, _CHUNK)
    staged, fill, at = torch.frombuffer(buffer, dtype=torch.uint8), 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for data in streams:
            pos = 0
            while pos < data.numel():
                n = min(_CHUNK - fill, data.numel() - pos)
                staged[fill:fill + n].copy_(data[pos:pos + n])
                fill, pos = fill + n, pos + n
                if fill == _CHUNK:
                    at += os.pwrite(fd, buffer, at)
                    fill = 0
        if fill:
            view = memoryview(buffer)[:-(-fill // _ALIGN) * _ALIGN]
            os.pwrite(fd, view, at)
            view.release()
            at += fill
        os.ftruncate(fd, at)
    finally:
        os.close(fd)
        del staged
        buffer.close()


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
