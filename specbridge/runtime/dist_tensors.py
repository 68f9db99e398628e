"""A Megatron torch_dist checkpoint's tensors by the spec's global names, read without megatron-core.

megatron-core saves every tensor as chunks of one global tensor per checkpoint key: the tensors of stacked decoder
layers under one key with the layer as a prepended axis (`decoder.layers.mlp.linear_fc1.weight` [L, ...]), experts
with the expert as the next one, per-layer keys (`decoder.layers.3.…`) where layers differ. A tensor-parallel shard
is a chunk along its split axis (a gated fc1 two, one per half), so the assembled tensor is the one a single-rank
model holds, whatever layout wrote the checkpoint. `DistTensors` maps each spec name (`naming.spec_name`) to its
chunks and checks, before a byte is read, that every tensor the plan needs is there with the shape the importing
model had (`specbridge.json` records it), that its chunks tile it exactly and that every chunk lies inside a file of
the checkpoint. A tensor is read when asked for: each chunk is a `torch.save` blob inside a `*.distcp` file,
located through the blob's zip directory and its pickle (read by an unpickler that knows one tensor rebuild and
the storage types, nothing else); its bytes are `preadv`'d straight into the tensor (a chunk that is not one
contiguous block of it is read whole, then copied).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from . import dist_metadata, dtypes
from .direct_read import read_exactly
from .naming import spec_name, stacked_axes
from .safetensors_io import shard_path

BLOCK_BYTES = 32 << 20  # large chunks are read in blocks of this size, several at once
MAX_PICKLE_BYTES = 1 << 20
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece of a tensor: its box in the tensor and the blob that holds it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Stored:
    key: str  # the checkpoint key (several spec names share a stacked one)
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]


class DistTensors(Mapping):
    """Spec name -> tensor of the checkpoint in `dist_dir` (vetted `metadata`), for the tensors of the keys in
    `recorded` (key -> global shape, as `save` recorded them); read on access. A context manager (closes its
    files)."""

    def __init__(self, dist_dir: Path, metadata, recorded: Mapping[str, list[int]], threads: int | None = None):
        self.dist_dir = Path(dist_dir)
        self.stored = _index(self.dist_dir, metadata, recorded)
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1), thread_name_prefix="specbridge-read")

    def __enter__(self) -> "DistTensors":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.stored[name]
        tensor = torch.empty(stored.shape, dtype=stored.dtype)
        jobs, copies = [], []
        for chunk in stored.chunks:
            box = tensor[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))]
            if box.numel() == 0:
                continue
            target = box if box.is_contiguous() else torch.empty(chunk.sizes, dtype=stored.dtype)
            jobs += self._submit(name, stored, chunk, target)
            if target is not box:
                copies.append((box, target))
        for job in jobs:
            job.result()
        for box, target in copies:
            box.copy_(target)
        return tensor

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self.stored

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of most of the floating-point numbers (`dtypes.dominant`); None when there are none."""
        return dtypes.dominant((s.dtype, math.prod(s.shape)) for s in self.stored.values())

    def nbytes(self, name: str) -> int:
        stored = self.stored[name]
        return math.prod(stored.shape) * stored.dtype.itemsize

    def only(self, names: Iterable[str]) -> "Share":
        """A view holding only `names` (what one rank writes) that still reads any tensor (a scale, a check)."""
        return Share(self, frozenset(names))

    # ------------------------------------------------------------ reading

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            try:
                self._fds[file] = os.open(shard_path(self.dist_dir, file), os.O_RDONLY)
            except OSError as exc:
                raise ConversionError(f"cannot read '{self.dist_dir / file}': {exc}") from None
        return self._fds[file]

    def _submit(self, name: str, stored: Stored, chunk: Chunk, target: torch.Tensor) -> list:
        """Reads of one chunk's bytes into `target` (contiguous, the chunk's sizes), in blocks on the pool."""
        fd = self._fd(chunk.file)
        where = f"'{self.dist_dir / chunk.file}' (tensor '{stored.key}' at {list(chunk.offsets)})"
        start = _storage_start(fd, chunk, stored.dtype, target.numel(), where)
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        self.bytes_read += len(view)
        return [self._pool.submit(_pread, fd, view[i:i + BLOCK_BYTES], start + i, where, name)
                for i in range(0, len(view), BLOCK_BYTES)]


class Share(Mapping):
    """`DistTensors.only`: membership restricted to one rank's names, reads unrestricted."""

    def __init__(self, tensors: DistTensors, names: frozenset[str]):
        self.tensors, self.names = tensors, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _pread(fd: int, view: memoryview, offset: int, where: str, name: str) -> None:
    try:
        read_exactly(fd, view, offset, where)
    except ConversionError as exc:
        raise exc.located(key=name) from None


# ---------------------------------------------------------------- the index (checked before any tensor is read)


def _index(dist_dir: Path, metadata, recorded: Mapping[str, list[int]]) -> dict[str, Stored]:
    """Spec name -> where its chunks are, for the tensors of every key in `recorded` (key -> global shape, as
    written at import); a ConversionError for a missing key, a shape other than the recorded one, chunks that do
    not tile a tensor or a chunk outside its file."""
    where = f"the Megatron checkpoint '{dist_dir}'"
    storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
    sizes: dict[str, int] = {}
    found: dict[str, tuple[str, tuple[int, ...], torch.dtype, list[Chunk]]] = {}
    for key, shape in recorded.items():
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, dist_metadata.TensorStorageMetadata):
            raise ConversionError(f"{where} lacks tensor '{key}'", key=key)
        axes, size = stacked_axes(key), tuple(entry.size)
        if size != tuple(shape) or len(size) < axes:
            raise ConversionError(f"{where} holds '{key}' with shape {list(size)}, not the {list(shape)} of the "
                                  f"model it was written from", key=key)
        for chunk in entry.chunks:
            offsets, extent = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(size) or len(extent) != len(size) or any(n != 1 for n in extent[:axes]) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, extent, size)):
                raise ConversionError(f"{where} is damaged: a chunk of '{key}' lies outside the tensor", key=key)
            info = storage.get((key, offsets))
            if info is None:
                raise ConversionError(f"{where} is damaged: a chunk of '{key}' has no stored data", key=key)
            file, at, length = info.relative_path, info.offset, info.length
            if file not in sizes:
                sizes[file] = shard_path(dist_dir, file).stat().st_size
            if at + length > sizes[file]:
                raise ConversionError(f"{where} is damaged: '{file}' ends before the data of '{key}'", key=key)
            name = spec_name(key, offsets[:axes])
            record = found.setdefault(name, (key, size[axes:], entry.properties.dtype, []))
            record[3].append(Chunk(offsets[axes:], extent[axes:], file, at, length))
    for name, (_, shape, _, chunks) in found.items():
        _check_tiling(name, shape, chunks, where)
    return {name: Stored(key, shape, dtype, tuple(chunks)) for name, (key, shape, dtype, chunks) in found.items()}


def _check_tiling(name: str, shape: tuple[int, ...], chunks: list[Chunk], where: str) -> None:
    """The chunks cover the tensor exactly once: their volumes add up and no two overlap."""
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape) or any(
            all(a.offsets[d] < b.offsets[d] + b.sizes[d] and b.offsets[d] < a.offsets[d] + a.sizes[d]
                for d in range(len(shape)))
            for i, a in enumerate(chunks) for b in chunks[i + 1:]):
        raise ConversionError(f"{where} is damaged: the chunks of '{name}' do not cover it exactly once", key=name)


# ---------------------------------------------------------------- one chunk's blob (torch.save's zip format)


class _Slice(io.RawIOBase):
    """A read-only file object over bytes [start, start + length) of a file descriptor (what zipfile reads)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _TensorRecord(pickle.Unpickler):
    """Reads the pickle of `torch.save(tensor)`: one `_rebuild_tensor_v2` of one storage, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: ("tensor", storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of a saved tensor")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError("a storage reference of an unknown form")
        return pid[1], pid[2], pid[4]


def _same_box(size: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """A saved chunk's shape is the chunk's, with a 1 for each prepended (layer, expert) axis."""
    lead = len(size) - len(sizes)
    return lead >= 0 and all(n == 1 for n in size[:lead]) and tuple(size[lead:]) == tuple(sizes)


def _storage_start(fd: int, chunk: Chunk, dtype: torch.dtype, numel: int, where: str) -> int:
    """The absolute offset of the chunk's first element in its file, after checking that the blob holds exactly a
    contiguous tensor of `dtype` and the chunk's sizes, stored uncompressed."""
    try:
        with zipfile.ZipFile(_Slice(fd, chunk.offset, chunk.length)) as blob:
            members = {info.filename: info for info in blob.infolist()}
            pickled = next((i for n, i in members.items() if n.endswith("/data.pkl")), None)
            if pickled is None or pickled.file_size > MAX_PICKLE_BYTES:
                raise ValueError("no tensor record")
            record = _TensorRecord(io.BytesIO(blob.read(pickled))).load()
            if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "tensor"):
                raise ValueError("not one tensor")
            _, (stored_dtype, key, stored_numel), offset, size, stride = record
            data = members.get(f"{pickled.filename.rsplit('/', 1)[0]}/data/{key}")
            expected_stride = tuple(math.prod(size[d + 1:]) for d in range(len(size)))
            if data is None or data.compress_type != zipfile.ZIP_STORED or stored_dtype != dtype or \
                    not _same_box(size, chunk.sizes) or (numel > 1 and stride != expected_stride) or not isinstance(offset, int) \
                    or offset < 0 or offset + numel > stored_numel or data.file_size != stored_numel * dtype.itemsize:
                raise ValueError("not a stored tensor of the expected dtype and shape")
            header = os.pread(fd, 30, chunk.offset + data.header_offset)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ValueError("a damaged zip entry")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = data.header_offset + 30 + name_len + extra_len + offset * dtype.itemsize
            if start + numel * dtype.itemsize > chunk.length:
                raise ValueError("data beyond the blob")
            return chunk.offset + start
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, EOFError, OSError, IndexError,
            KeyError, AttributeError, struct.error) as exc:
        raise ConversionError(f"{where} is damaged: {exc}") from None
