"""Streaming safetensors I/O: a lazy reader of HF checkpoints and an atomic, sharded writer.

Reader: opens `model.safetensors.index.json` (or reads the header of every `*.safetensors` file) and reads a
tensor, one slice of a stacked tensor, or a row range only when asked, as a view of a private memory map of just
those bytes. Keys, shapes, dtypes and offsets all come from each file's header, parsed and validated once
(`direct_read.read_header`). The map lives as long as the views of it, so
the file-backed pages a read touches leave the process with the tensors built from them, instead of piling up in
a map of the whole file. It counts the bytes it reads (the multi-rank runtime proves each rank reads only its
share).

Writer: tensors are added one at a time and flushed to shard files when a shard is full, so the whole model is
never held at once; a shard's bytes go from the tensors' memory to the device (`file_writes`). It writes into a
staging directory (see `collectives.staged_output`) that becomes the output only when every rank succeeded, so no
half-written output is left behind.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import torch

from ..errors import ConversionError
from . import dtypes
from .direct_read import Entry, read_header
from .file_writes import OutputFile, flat_bytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointReader:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._headers: dict[str, dict[str, Entry]] = {}
        self.bytes_read = 0
        self.key_to_file = self._discover()
        self._keys = frozenset(self.key_to_file)

    def _discover(self) -> dict[str, str]:
        if not self.directory.is_dir():
            raise ConversionError(f"checkpoint directory '{self.directory}' does not exist")
        index = self.directory / INDEX_NAME
        if index.exists():
            return self._read_index(index)
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors files in '{self.directory}'")
        key_to_file: dict[str, str] = {}
        for file in files:
            shard_path(self.directory, file)
            for key in self._header(file):
                if key in key_to_file:
                    raise ConversionError(f"tensor '{key}' is in two shard files, '{key_to_file[key]}' and "
                                          f"'{file}' (and no {INDEX_NAME} says which one counts)", key=key)
                key_to_file[key] = file
        return key_to_file

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"corrupt index file '{index}': {type(exc).__name__}: {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(f, str)
                                                       for k, f in weight_map.items()):
            raise ConversionError(f"corrupt index file '{index}': 'weight_map' must map tensor names to file "
                                  f"names, not {type(weight_map).__name__}")
        files = sorted(set(weight_map.values()))
        for file in files:
            shard_path(self.directory, file)
        missing = [f for f in files if not (self.directory / f).is_file()]
        if missing:
            raise ConversionError(f"index '{index}' names shard file(s) that do not exist: {missing}")
        return dict(weight_map)

    def _header(self, file: str) -> dict[str, Entry]:
        """The validated header of shard `file`, parsed once."""
        if file not in self._headers:
            self._headers[file] = read_header(self.directory / file)
        return self._headers[file]

    def keys(self) -> frozenset[str]:
        return self._keys  # built once: callers test membership per tensor

    def file_of(self, key: str) -> str:
        if key not in self.key_to_file:
            raise ConversionError(f"tensor '{key}' is not in the checkpoint '{self.directory}'", key=key)
        return self.key_to_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entry(key)[1].shape

    def dtype(self, key: str) -> str:
        """The safetensors name of the tensor's dtype ("BF16", "F32", ...)."""
        return dtypes.NAMES[self.entry(key)[1].dtype]

    def entry(self, key: str) -> tuple[str, Entry]:
        """(file, `direct_read.Entry`): where the bytes of `key` lie, from the file's validated header."""
        file = self.file_of(key)
        header = self._header(file)
        if key not in header:
            raise ConversionError(f"tensor '{key}' is not in '{self.directory / file}'", key=key)
        return file, header[key]

    def get(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key`; with `index`, one slice of a stacked tensor; with `rows` / `cols`, a range of the
        first / second dim (of that slice). Only the bytes asked for are read (a column range maps the rows it
        lies in). The result is a view of a private map of those bytes (writing to it never reaches the file)."""
        file, entry = self.entry(key)
        _check_bounds(key, entry.shape, index, rows, cols)
        shape, item, start = entry.shape, entry.dtype.itemsize, entry.offset
        if index is not None:
            shape = shape[1:]
            start += index * math.prod(shape) * item
        if rows is not None:
            start += rows[0] * math.prod(shape[1:]) * item
            shape = (rows[1] - rows[0], *shape[1:])
        tensor = self._map(file, start, shape, entry.dtype)
        if cols is not None:
            tensor = tensor[:, cols[0]:cols[1]]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _map(self, file: str, start: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            fd = os.open(self.directory / file, os.O_RDONLY)
            try:  # the map keeps a descriptor of its own
                mapped = mmap.mmap(fd, start - aligned + count * dtype.itemsize, access=mmap.ACCESS_COPY,
                                   offset=aligned)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"cannot read '{self.directory / file}': {exc}") from None
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start - aligned).view(shape)

    def close(self) -> None:
        """Forget the cached headers (the reader holds no open file: each map keeps its own descriptor)."""
        self._headers.clear()


def _check_bounds(key: str, shape: tuple[int, ...], index, rows, cols) -> None:
    """A stack index or row/column range that the tensor does not have is the checkpoint's error, named."""
    dims = list(shape)
    if index is not None:
        if not dims or not 0 <= index < dims[0]:
            raise ConversionError(f"tensor '{key}' of shape {list(shape)} has no entry {index} along its first "
                                  f"(stacked) dim: the checkpoint has fewer experts/layers than its config says",
                                  key=key)
        dims = dims[1:]
    for what, bounds, dim in (("rows", rows, 0), ("columns", cols, 1)):
        if bounds is not None and (len(dims) <= dim or not 0 <= bounds[0] <= bounds[1] <= dims[dim]):
            raise ConversionError(f"tensor '{key}' of shape {list(shape)} has no {what} {bounds[0]}:{bounds[1]}"
                                  + (f" in entry {index}" if index is not None else ""), key=key)


def shard_path(directory: Path, name: str) -> Path:
    """The shard file `name` of the checkpoint in `directory`: a plain file name, never a path that leaves the
    directory (`..`, absolute, a subdirectory, a symlink to elsewhere; a Hugging Face cache snapshot's links into
    the same model's `blobs/` are followed)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConversionError(f"shard file name '{name}' in '{directory}' is not a plain file name inside the "
                              f"checkpoint directory")
    path = directory / name
    if path.is_symlink():
        target, base = path.resolve(), directory.resolve()
        blobs = base.parent.parent / "blobs" if base.parent.name == "snapshots" else None
        if not (target.is_relative_to(base) or blobs is not None and target.is_relative_to(blobs)):
            raise ConversionError(f"shard file '{path}' is a link to '{target}', outside the checkpoint directory")
    return path


_DTYPE_NAMES = dtypes.NAMES


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The safetensors header (length prefix + JSON, padded to 8 bytes) for tensors laid out in this order."""
    header, offset = {"__metadata__": metadata}, 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def layout_file(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int], int]:
    """(header, key -> absolute byte offset of its data, file size) of a safetensors file holding these tensors in
    this order: what lets a file's tensors be written in place, by one process or several."""
    header = _header(entries, {"format": "pt"} if metadata is None else metadata)
    offsets, at = {}, len(header)
    for key, dtype, shape in entries:
        offsets[key] = at
        at += math.prod(shape) * dtype.itemsize
    return header, offsets, at


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy of the whole file): the
    header, then every tensor's bytes at its offset (`file_writes.OutputFile`)."""
    header, offsets, size = layout_file([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
    with OutputFile(path, size) as out:
        out.write(0, torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for key, tensor in tensors.items():
            out.write(offsets[key], flat_bytes(tensor))


class _FileStack:
    """A large stacked tensor written slice by slice, in place, into a shard file of its own."""

    def __init__(self, path: Path, key: str, length: int, first: torch.Tensor):
        self.length, self.filled = length, set()
        self.slice_bytes = first.numel() * first.element_size()
        header, offsets, size = layout_file([(key, first.dtype, (length, *first.shape))])
        self.data_start = offsets[key]
        self.file = OutputFile(path, size)
        self.file.write(0, torch.frombuffer(bytearray(header), dtype=torch.uint8))

    def write(self, index: int, tensor: torch.Tensor) -> bool:
        self.file.write(self.data_start + index * self.slice_bytes, flat_bytes(tensor))
        self.filled.add(index)
        if len(self.filled) < self.length:
            return False
        self.file.close()
        return True


class _MemoryStack:
    """A small stacked tensor assembled in one preallocated tensor."""

    def __init__(self, length: int, first: torch.Tensor):
        self.tensor = first.new_empty((length, *first.shape))
        self.length, self.filled = length, set()

    def write(self, index: int, tensor: torch.Tensor) -> bool:
        self.tensor[index].copy_(tensor)
        self.filled.add(index)
        return len(self.filled) == self.length


class CheckpointWriter:
    """Writes tensors into size-bounded shards inside a staging directory, without copying their data.

    Tensors handed in as `owned` (built for the export: split parts, gathered or cast tensors) end the current
    shard once they add up to `max_owned_bytes`; other tensors are the model's own memory. The slices of a stacked
    tensor (fused experts) of `max_owned_bytes` or more are written in place into a shard of their own as they
    arrive, so a large stack is never assembled in memory; smaller stacks are assembled in one preallocated tensor
    and then added as owned. In a distributed export each writing rank passes its own `shard_prefix`.
    """

    def __init__(self, staging: str | Path, max_shard_bytes: int = 2 << 30, shard_prefix: str = "model",
                 max_owned_bytes: int = 256 << 20):
        self.staging = Path(staging)
        self.max_shard_bytes = max_shard_bytes
        self.max_owned_bytes = max_owned_bytes
        self._owned_bytes = 0
        self.shard_prefix = shard_prefix
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[str] = []
        self._stacks: dict[str, tuple[str | None, _FileStack | _MemoryStack]] = {}

    def _next_name(self) -> str:
        name = f"{self.shard_prefix}-part{len(self._files):05d}.safetensors"
        self._files.append(name)
        return name

    def _check_new(self, key: str) -> None:
        if key in self.weight_map or key in self._pending:
            raise ConversionError(f"tensor '{key}' written twice", key=key)

    def add(self, key: str, tensor: torch.Tensor, owned: bool = False) -> None:
        self._check_new(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[key] = tensor.detach()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self._owned_bytes += nbytes if owned else 0
        if self._owned_bytes >= self.max_owned_bytes:
            self.flush()

    def add_slice(self, key: str, index: int, length: int, tensor: torch.Tensor) -> bool:
        """Slice `index` of the stacked tensor `key` ([length, *tensor.shape]); True once the stack is complete."""
        if key not in self._stacks:
            self._check_new(key)
            if length * tensor.numel() * tensor.element_size() >= self.max_owned_bytes:
                name = self._next_name()
                self._stacks[key] = (name, _FileStack(self.staging / name, key, length, tensor))
            else:
                self._stacks[key] = (None, _MemoryStack(length, tensor))
        name, stack = self._stacks[key]
        if not stack.write(index, tensor.detach()):
            return False
        del self._stacks[key]
        if name is None:
            self.add(key, stack.tensor, owned=True)
        else:
            self.weight_map[key] = name
            self.total_bytes += length * stack.slice_bytes
        return True

    def open_stacks(self) -> list[str]:
        return sorted(self._stacks)

    def flush(self) -> None:
        if not self._pending:
            return
        name = self._next_name()
        write_safetensors(self.staging / name, self._pending, {"format": "pt"})
        self.weight_map.update({k: name for k in self._pending})
        self._pending, self._pending_bytes, self._owned_bytes = {}, 0, 0

    def finish(self) -> dict[str, str]:
        """Flush the last shard; the weight map (key -> staged file name)."""
        self.flush()
        return dict(self.weight_map)


def final_names(weight_map: dict[str, str]) -> dict[str, str]:
    """Staged shard names -> HF names (`model.safetensors` or `model-0000k-of-0000n.safetensors`)."""
    files = sorted(set(weight_map.values()))
    if len(files) == 1:
        return {files[0]: SINGLE_NAME}
    return {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}


def finalize(staging: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Rename staged shards to their HF names and write the index (when there is more than one shard)."""
    names = final_names(weight_map)
    for old, new in names.items():
        os.replace(staging / old, staging / new)
    if len(names) > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {k: names[f] for k, f in sorted(weight_map.items())}}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
