"""Streaming safetensors I/O: a lazy reader of HF checkpoints and an atomic, sharded writer.

Reader: opens `model.safetensors.index.json` (or every `*.safetensors` file), memory-maps files with
`safe_open`, and reads a tensor, one slice of a stacked tensor, or a row range only when asked. It counts the
bytes it reads (the multi-rank runtime proves each rank reads only its share).

Writer: tensors are added one at a time and flushed to shard files when a shard is full, so the whole model is
never held at once. It writes into a staging directory (see `collectives.shared_staging`) that becomes the
output only when every rank succeeded, so no half-written output is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .ops import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointReader:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.key_to_file = self._discover()

    def _discover(self) -> dict[str, str]:
        if not self.directory.is_dir():
            raise ConversionError(f"checkpoint directory '{self.directory}' does not exist")
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"corrupt index file '{index}': {exc}") from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise ConversionError(f"index '{index}' names shard file(s) that do not exist: {missing}")
            return dict(weight_map)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors files in '{self.directory}'")
        return {key: f.name for f in files for key in self._open(f.name).keys()}

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ConversionError(f"cannot read safetensors file '{self.directory / file}': {exc}") from None
        return self._handles[file]

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def file_of(self, key: str) -> str:
        if key not in self.key_to_file:
            raise ConversionError(f"tensor '{key}' is not in the checkpoint '{self.directory}'", key=key)
        return self.key_to_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def _slice(self, key: str):
        file = self.file_of(key)
        try:
            return self._open(file).get_slice(key)
        except ConversionError as exc:
            raise ConversionError(str(exc), key=key) from None
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"cannot read '{key}' from '{file}': {exc}", key=key) from None

    def get(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key`; with `index`, one slice of a stacked tensor; with `rows` / `cols`, a range of the
        first / second dim (of that slice). Only the bytes asked for are read."""
        selection = (slice(index, index + 1),) if index is not None else ()
        selection += (slice(*rows) if rows is not None else slice(None),)
        if cols is not None:
            selection += (slice(*cols),)
        tensor_slice = self._slice(key)
        try:
            tensor = tensor_slice[selection]
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ConversionError(f"cannot read '{key}' from '{self.file_of(key)}': {exc}", key=key) from None
        if index is not None:
            tensor = tensor[0]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._handles.clear()


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy of the data)."""
    header, offset = {"__metadata__": metadata}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


class CheckpointWriter:
    """Writes tensors into size-bounded shards inside a staging directory, without copying their data.

    Tensors handed in as `owned` (built for the export, e.g. stacked experts) end the current shard once they add
    up to `max_owned_bytes`, so at most about one large one is held; other tensors are the model's own memory.
    In a distributed export each writing rank passes its own `shard_prefix`.
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

    def add(self, key: str, tensor: torch.Tensor, owned: bool = False) -> None:
        if key in self.weight_map or key in self._pending:
            raise ConversionError(f"tensor '{key}' written twice", key=key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[key] = tensor.detach()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self._owned_bytes += nbytes if owned else 0
        if self._owned_bytes >= self.max_owned_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"{self.shard_prefix}-part{len(self._files):05d}.safetensors"
        write_safetensors(self.staging / name, self._pending, {"format": "pt"})
        self._files.append(name)
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
