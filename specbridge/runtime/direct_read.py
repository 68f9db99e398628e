"""Direct reads: HF checkpoint bytes go from the file straight into parameter memory, once.

For a mapping whose program only places parts (no arithmetic, no dtype change: `Fuse` and absent parts), every
byte of the local Megatron tensor has one known place in the file. `plan_reads` describes both sides as strided
views over flat byte ranges — the source as a view of the tensor in the safetensors file (narrowed to this rank's
chunk of the sharded axis, or to one slice of a stacked tensor), the destination as a view of the parameter
(narrowed to the part's place along the layout's parts bracket) — and cuts them into contiguous blocks, each one
`os.preadv` from the file into the parameter's own storage. So there is no mmap, no intermediate tensor, no
`cat` and no copy: a query group's q, k and v rows land in their place in the fused QKV parameter directly.

`DirectReader` runs the blocks on a small thread pool (reads release the GIL, so both cores fill pages), counts
the bytes read into the `CheckpointReader` it serves (the multi-rank tests prove each rank reads only its share),
and validates every header offset against the file size (a truncated or lying file is a `ConversionError`).
A fused HF tensor whose HF-side layout puts each part in a block of rows (Phi-3's `qkv_proj`) is placed part by
part, each part's block of rows a source of its own. A vocab shard reads the real rows it holds and zeroes its rows
of padding. Mappings it cannot place (arithmetic ops, a dtype change, a below-TP layout) are left to the general
importer path: `plan_reads` answers None.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compiler import ir
from ..compiler.layouts import LayoutError, axis_position, bracket_position, factored_shape, infer_sizes, part_rows
from ..errors import ConversionError
from . import tp
from .dtypes import SAFETENSORS as _DTYPES

BLOCK_BYTES = 32 << 20  # reads larger than this are cut so the pool's threads share a large tensor
SMALL_BLOCK_BYTES, MANY_BLOCKS = 16 << 10, 64  # more blocks than this, each smaller: one strided copy instead
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one tensor's bytes lie in its safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of element 0 in the file


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file and their absolute byte offsets, validated against the file size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ConversionError(f"safetensors file '{path}' has a header length of {length} bytes for a "
                                      f"file of {size} bytes")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ConversionError(f"cannot read safetensors file '{path}': {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"safetensors file '{path}' has a corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"safetensors file '{path}' has a header that is not an object")
    start, out = 8 + length, {}
    for key, info in header.items():
        if key != "__metadata__":
            out[key] = _entry(path, key, info, start, size)
    return out


def _entry(path: Path, key: str, info, data_start: int, file_size: int) -> Entry:
    name = info.get("dtype") if isinstance(info, dict) else None
    if isinstance(name, str) and name not in _DTYPES:
        raise ConversionError(f"safetensors file '{path}' holds tensor '{key}' of dtype '{name}', which is not "
                              f"supported (known: {', '.join(_DTYPES)})", key=key)
    try:
        dtype, shape, (begin, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or end - begin != math.prod(shape) * dtype.itemsize or data_start + end > file_size:
        raise ConversionError(f"safetensors file '{path}' describes tensor '{key}' inconsistently or beyond the "
                              f"end of the file: {info}", key=key)
    return Entry(dtype, shape, data_start + begin)


@dataclass(frozen=True, slots=True)
class Read:
    """One contiguous block: `nbytes` from `file` at `offset` into `target`'s bytes at `into`."""

    file: str
    offset: int
    into: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class FillPlan:
    """Everything that fills one local tensor: the reads, then the absent parts (copied or zeroed in place)."""

    reads: tuple[Read, ...]
    copies: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]  # (destination view, source view or None=zeros)


def placeable(mapping: ir.Mapping) -> bool:
    hf_layout = mapping.hf_layout
    return all(isinstance(op, (ir.Fuse, ir.FillAbsent, ir.SplitSource)) for op in mapping.hf_to_mcore) and \
        all(op.policy in ("copy_of", "zeros") for op in mapping.hf_to_mcore if isinstance(op, ir.FillAbsent)) and \
        (hf_layout is None or hf_layout.dims[0][:1] == (ir.BRACKET,))


def _row_blocks(mapping: ir.Mapping, source: ir.Source, file: str, entry: Entry):
    """The parts of a fused HF tensor (an HF-side layout whose parts are blocks of rows) as entries of their own:
    each part's rows are one contiguous stretch of the file. None when the shape does not fit the layout."""
    shape = entry.shape[1:] if source.index is not None else entry.shape
    try:
        rows = part_rows(mapping.hf_layout, shape)
    except LayoutError:
        return None  # the general path reports the shape error
    row_bytes = math.prod(shape[1:]) * entry.dtype.itemsize
    start = entry.offset + (source.index * math.prod(shape) * entry.dtype.itemsize if source.index is not None else 0)
    return {part: (ir.Source(part, source.key), file, Entry(entry.dtype, (b - a, *shape[1:]), start + a * row_bytes))
            for part, (a, b) in rows.items()}


def plan_reads(target: torch.Tensor, mapping: ir.Mapping, entries, rank: int, size: int,
               small_block_bytes: int = SMALL_BLOCK_BYTES) -> FillPlan | None:
    """The reads that fill `target` (this rank's tensor of `mapping`) straight from the files, or None when the
    mapping needs the general path (or would take more than `MANY_BLOCKS` blocks under `small_block_bytes` each).
    `entries(key)` -> (file, Entry). Read backwards, the same blocks are where a multi-rank export writes
    `target`'s bytes (`direct_write`)."""
    shard = mapping.shard
    sharded = size > 1 and shard.kind != "replicated"
    if not placeable(mapping) or not target.is_contiguous() or sharded and shard.kind not in ("axis", "vocab"):
        return None
    sources = {s.part: (s, *entries(s.key)) for s in mapping.sources}
    for s, _, e in sources.values():
        if s.index is not None and e.shape and not 0 <= s.index < e.shape[0]:
            raise ConversionError(f"tensor '{s.key}' of shape {list(e.shape)} has no entry {s.index} along its first "
                                  f"(stacked) dim", key=s.key)
    if any(e.dtype != target.dtype or (s.index is not None and not e.shape) for s, _, e in sources.values()):
        return None
    if mapping.hf_layout is not None:
        sources = _row_blocks(mapping, *next(iter(sources.values())))
        if sources is None:
            return None
    fuse = next((op for op in mapping.hf_to_mcore if isinstance(op, ir.Fuse)), None)
    layout = fuse.layout if fuse is not None else None
    if layout is None:
        if len(sources) != 1 or mapping.layout is not None and sharded:
            return None
        ((source, file, entry),) = sources.values()
        src = _source_view(entry, source.index, None, None)
        if shard.kind == "vocab":
            return _plan_vocab(target, file, entry, src, rank, small_block_bytes)
        if sharded:
            src = _narrow_chunk(src, shard.dim, rank, size)
        return _plan_parts(target, [(file, entry, src, target)], (), small_block_bytes)
    return _plan_fused(target, mapping, layout, sources, rank, size if sharded else 1, small_block_bytes)


def _plan_fused(target, mapping, layout, sources, rank, size, small_block_bytes) -> FillPlan | None:
    axis = mapping.shard.axis if size > 1 else None
    if size > 1 and (axis is None or layout.size(axis) is not None and layout.size(axis) < size):
        return None  # below TP: megatron-core cuts through the groups (general path)
    try:
        full = dict(layout.sizes)
        for part, (source, _, entry) in sources.items():
            full.update(infer_sizes(layout, entry.shape[1 if source.index is not None else 0:], part))
    except ValueError:
        return None  # the general path reports the shape error
    if axis is not None and full[axis] % size:
        return None
    local = dict(full, **({axis: full[axis] // size} if axis is not None else {}))
    if math.prod(factored_shape(layout, local)) != target.numel():
        return None
    fused = target.view(factored_shape(layout, local))
    bracket = bracket_position(layout)
    starts = dict(zip(layout.part_names, itertools.accumulate((e for _, e in layout.parts), initial=0)))

    def place(part):
        if bracket is None:
            return fused
        return fused.narrow(bracket, starts[part], dict(layout.parts)[part])

    reads = []
    for part, (source, file, entry) in sources.items():
        src = _source_view(entry, source.index, layout, factored_shape(layout, full, part))
        if axis is not None:
            src = _narrow_chunk(src, axis_position(layout, axis), rank, size)
        reads.append((file, entry, src, place(part)))
    copies = tuple((place(op.part), place(op.source_part) if op.policy == "copy_of" else None)
                   for op in mapping.hf_to_mcore if isinstance(op, ir.FillAbsent))
    return _plan_parts(target, reads, copies, small_block_bytes)


def _plan_vocab(target, file, entry, src, rank, small_block_bytes) -> FillPlan | None:
    """A vocab shard: the real rows this rank holds, read in place; the rows of padding after them zeroed."""
    if not target.dim() or not src.dim():
        return None
    rows = target.shape[0]
    start, stop = tp.vocab_row_range(rank, rows, src.shape[0])
    real = stop - start
    pad = ((target.narrow(0, real, rows - real), None),) if real < rows else ()
    return _plan_parts(target, [(file, entry, src.narrow(0, start, real), target.narrow(0, 0, real))], pad,
                       small_block_bytes)


def _source_view(entry: Entry, index: int | None, layout, factored) -> torch.Tensor:
    """The tensor in the file as a meta view (its strides and storage offset locate every element)."""
    meta = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
    if index is not None:
        meta = meta[index]
    return meta.view(factored) if factored is not None else meta


def _narrow_chunk(view: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor | None:
    if dim is None or dim >= view.dim() or view.shape[dim] % size:
        return None
    chunk = view.shape[dim] // size
    return view.narrow(dim, rank * chunk, chunk)


def _plan_parts(target, parts, copies, small_block_bytes) -> FillPlan | None:
    base = target.storage_offset()
    reads = []
    for file, entry, src, dst in parts:
        if src is None or tuple(src.shape) != tuple(dst.shape):
            return None
        shape = tuple(src.shape)
        k = len(shape) - min(_contiguous_tail(shape, src.stride()), _contiguous_tail(shape, dst.stride()))
        if math.prod(shape[:k]) > MANY_BLOCKS and math.prod(shape[k:]) * entry.dtype.itemsize < small_block_bytes:
            return None  # e.g. the rows of a column-split expert: one strided copy beats a read per row
        reads += _blocks(file, entry, src, dst, base)
    return FillPlan(tuple(coalesce(reads)), copies)


def _contiguous_tail(shape, strides) -> int:
    """How many trailing dims form one contiguous block."""
    expected, count = 1, 0
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != expected:
            break
        expected *= extent
        count += 1
    return count


def _blocks(file: str, entry: Entry, src: torch.Tensor, dst: torch.Tensor, base: int):
    shape, item = tuple(src.shape), entry.dtype.itemsize
    k = len(shape) - min(_contiguous_tail(shape, src.stride()), _contiguous_tail(shape, dst.stride()))
    nbytes = math.prod(shape[k:]) * item
    if nbytes == 0:
        return
    # the element offsets of every block, over the index grid of the first k dims (the first slowest)
    s = torch.tensor([src.storage_offset()], dtype=torch.int64)
    d = torch.tensor([dst.storage_offset() - base], dtype=torch.int64)
    for extent, s_stride, d_stride in zip(shape[:k], src.stride(), dst.stride()):
        steps = torch.arange(extent, dtype=torch.int64)
        s = (s[:, None] + steps * s_stride).reshape(-1)
        d = (d[:, None] + steps * d_stride).reshape(-1)
    for at, into in zip((s * item + entry.offset).tolist(), (d * item).tolist()):
        yield Read(file, at, into, nbytes)


def coalesce(reads: list[Read]):
    """Adjacent blocks (next in the file and next in memory) become one read."""
    current = None
    for r in reads:
        if current is not None and r.file == current.file and r.offset == current.offset + current.nbytes \
                and r.into == current.into + current.nbytes:
            current = Read(current.file, current.offset, current.into, current.nbytes + r.nbytes)
            continue
        if current is not None:
            yield current
        current = r
    if current is not None:
        yield current


class DirectReader:
    """Fills tensors from a `CheckpointReader`'s files by `os.preadv`, on `threads` threads; a context manager
    (the pool and file descriptors close on exit). `fill` returns False for a mapping it cannot place."""

    def __init__(self, reader, threads: int | None = None):
        self.reader = reader
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1))
        self._pending: list = []

    def __enter__(self) -> "DirectReader":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def entry(self, key: str) -> tuple[str, Entry]:
        return self.reader.entry(key)

    def fill(self, target: torch.Tensor, mapping: ir.Mapping, rank: int, size: int) -> bool:
        plan = plan_reads(target, mapping, self.entry, rank, size)
        if plan is None:
            return False
        buffer = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy()) if target.numel() else None
        jobs, batch, batch_bytes = [], [], 0
        for r in plan.reads:  # small reads (e.g. the rows of a column-split tensor) go in batches: one task each
            for o, n in _pieces(r.nbytes):
                batch.append((self._fd(r.file), r.file, r.offset + o, buffer[r.into + o: r.into + o + n]))
                batch_bytes += n
                if batch_bytes >= BLOCK_BYTES:
                    jobs.append(self._pool.submit(self._read_all, batch))
                    batch, batch_bytes = [], 0
        if batch:
            jobs.append(self._pool.submit(self._read_all, batch))
        self.reader.bytes_read += sum(r.nbytes for r in plan.reads)
        self._pending.append((mapping, jobs, plan.copies))
        return True

    def wait(self) -> None:
        """Finish every read submitted so far (and the absent parts that copy them)."""
        pending, self._pending = self._pending, []
        for mapping, jobs, copies in pending:
            try:
                for job in jobs:
                    job.result()
            except ConversionError as exc:
                raise exc.located(key=mapping.mcore, rule=mapping.span) from None
            for dst, src in copies:
                dst.copy_(src) if src is not None else dst.zero_()

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            try:
                self._fds[file] = os.open(self.reader.directory / file, os.O_RDONLY)
            except OSError as exc:
                raise ConversionError(f"cannot read '{self.reader.directory / file}': {exc}") from None
        return self._fds[file]

    def _read_all(self, reads) -> None:
        for read in reads:
            self._read(*read)

    def _read(self, fd: int, file: str, offset: int, view: memoryview) -> None:
        read_exactly(fd, view, offset, f"'{self.reader.directory / file}'")


def read_exactly(fd: int, view: memoryview, offset: int, where: str) -> None:
    """Fill `view` with the file's bytes from `offset` (`preadv`, which releases the GIL); a short file or a
    failed read is a ConversionError naming `where`."""
    done = 0
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        raise ConversionError(f"cannot read {where}: {exc}") from None
    if done < len(view):
        raise ConversionError(f"{where} ends before byte {offset + len(view)}")


def _pieces(nbytes: int):
    for start in range(0, nbytes, BLOCK_BYTES):
        yield start, min(BLOCK_BYTES, nbytes - start)
