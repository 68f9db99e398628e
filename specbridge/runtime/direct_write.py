"""Direct writes: in a multi-rank export each rank writes its own slices of the HF tensors straight into shared,
pre-laid-out safetensors files. Nothing is gathered.

The inverse of `direct_read`: for a mapping whose program only places parts (the mappings `plan_reads` places:
`Fuse`, plain copies, absent parts; no arithmetic, no dtype change), `plan_reads` against the HF tensor's place in
its file says where every byte of this rank's local tensor lies there, cut into contiguous blocks. A large block's
whole 4 KiB blocks go out direct (`file_writes.OutputFile.write_blocks`); its ends, which share a block with another
write, small blocks and the headers are written through the page cache (from the parameters' own memory) once
every rank's direct writes are done (a buffered write beside direct ones costs every direct write a writeback of the
pages they share). A vocab-split plain copy (embedding, output layer) is one block per rank, its padding rows left
out. Absent parts are checked on each rank's own slice.

The layout comes first, the same on every rank: each rank describes the HF tensors of the placeable mappings it
holds (their shapes from the derived program run on a meta tensor of the global Megatron shape); the descriptions
(metadata only) are all-gathered; every rank then lays the files out from them alike: the placed HF tensors in
plan order, packed into shards of at most `max_shard_bytes`. A mapping is placed only when every rank holding it
can place it, every HF tensor it writes is placed whole (a stacked experts tensor: all of its experts) and so is
the rest of its export group; everything else is left to the exporter's gather path. One rank creates each file at
its size; then every rank writes its blocks: a TP-split tensor's slices each by its own rank, a
replicated tensor by one rank (spread over the TP ranks by name), one data-parallel replica's copy only. Errors
are agreed on by all ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os

import torch

from ..compiler import ir
from ..compiler.layouts import LayoutError
from ..errors import ConversionError
from . import collector, dtypes
from .collectives import agree, gather_objects
from .direct_read import Entry, Read, coalesce, placeable, plan_reads
from .exporter import group_key, stats
from .file_writes import OutputFile, pwrite_all, writers
from .ops import _check_absent, run_export
from .parallel import Topology
from .placement import local_tensors, tp_of, writes_in_place
from .safetensors_io import layout_file

PREFIX = "direct"
SMALL_BLOCK_BYTES = 2 << 10  # many blocks smaller than this (a column-split tensor's rows): gathered instead
DIRECT_BYTES = 1 << 20  # a block at least this large is written direct (but for its ends); smaller ones buffered
_BATCH_BYTES = 32 << 20
_PLACING = (ir.Split, ir.SplitSource, ir.CheckAbsent)  # the export ops that only cut a tensor into parts


@collector.paused()
def export_placed(chunks, plan: ir.Plan, staging, topology: Topology, hf_dtype: torch.dtype | None,
                  max_shard_bytes: int, check_absent: bool = True, progress=None):
    """Write every placeable mapping's HF tensors into `staging` from the ranks that hold them. Returns (the plan
    of the mappings left to the gather path, weight map of the placed keys, their total bytes)."""
    tensors = local_tensors(chunks)
    vocab_rows = plan.model_kwargs().get("vocab_size")
    lengths = dict(plan.stacks)
    found = {i: _describe(m, tensors[m.mcore].detach(), topology, hf_dtype, vocab_rows, lengths)
             for i, m in enumerate(plan.mappings) if m.mcore in tensors}
    placed, shapes = _agreed(plan, gather_objects({i: f and f[0] for i, f in found.items()}))
    relative = {i: f[1] for i, f in found.items() if f is not None}
    weight_map, offsets, files, total = _layout(plan, placed, shapes, max_shard_bytes)
    error = None
    try:
        for n, (name, _, size) in enumerate(files):
            if n % topology.world_size == topology.rank:
                _create(staging / name, size)
    except OSError as exc:
        error = ConversionError(f"cannot write '{staging}': {exc}", rank=topology.rank)
    agree(error)  # every file is created at its size before any rank writes data
    headers = [(name, 0, memoryview(header)) for n, (name, header, _) in enumerate(files)
               if n % topology.world_size == topology.rank]
    sizes = {name: size for name, _, size in files}
    ends = []
    try:
        written, ends = _write_blocks(plan, placed, relative, tensors, topology, staging, weight_map, offsets,
                                      shapes, sizes, vocab_rows, check_absent)
        stats.placed_bytes += written
    except ConversionError as exc:
        error = exc.located(rank=topology.rank)
    except OSError as exc:
        error = ConversionError(f"cannot write '{staging}': {exc}", rank=topology.rank)
    agree(error)  # no rank writes direct any more: the bytes of shared blocks go through the page cache
    try:
        _write_buffered(staging, headers + ends)
    except OSError as exc:
        error = ConversionError(f"cannot write '{staging}': {exc}", rank=topology.rank)
    agree(error)
    if progress is not None and placed:
        progress(len(placed))
    rest = dataclasses.replace(plan, mappings=tuple(m for i, m in enumerate(plan.mappings) if i not in placed))
    return rest, weight_map, total


def _describe(mapping: ir.Mapping, tensor: torch.Tensor, topology: Topology, hf_dtype, vocab_rows, lengths):
    """({HF key: (dtype name, shape)}, its blocks) for this rank's tensor of `mapping` when its bytes can be placed
    (None otherwise): the shapes the derived program gives for the global Megatron tensor, and the `plan_reads` of
    the tensor against HF tensors laid out at offset 0 of files named by their keys (None for a vocab split)."""
    if hf_dtype is not None and tensor.dtype != hf_dtype or not tensor.is_contiguous() \
            or tensor.dtype not in dtypes.NAMES:
        return None
    rank, size = tp_of(topology, mapping)
    name = dtypes.NAMES[tensor.dtype]
    if mapping.shard.kind == "vocab":
        plain = not mapping.hf_to_mcore and not mapping.mcore_to_hf and len(mapping.sources) == 1
        if not plain or mapping.sources[0].index is not None or vocab_rows is None or not tensor.dim() \
                or not 0 < vocab_rows <= tensor.shape[0] * size:
            return None
        return {mapping.sources[0].key: (name, (vocab_rows, *tensor.shape[1:]))}, None
    if not placeable(mapping) or not all(isinstance(op, _PLACING) for op in mapping.mcore_to_hf):
        return None
    shape = list(tensor.shape)
    if size > 1 and mapping.shard.kind == "axis":
        shape[mapping.shard.dim] *= size
    try:
        parts = run_export(mapping, torch.empty(shape, dtype=tensor.dtype, device="meta"), check_absent=False)
        out = {}
        for s in mapping.sources:
            part = tuple(parts[s.part].shape)
            out[s.key] = (name, (lengths[s.key], *part) if s.index is not None else part)
    except (ConversionError, LayoutError, KeyError, RuntimeError, ValueError):
        return None  # the gather path reports what is wrong
    entries = {k: Entry(tensor.dtype, shp, 0) for k, (_, shp) in out.items()}
    try:
        found = plan_reads(tensor, mapping, lambda k: (k, entries[k]), rank, size, SMALL_BLOCK_BYTES)
    except ConversionError:
        return None
    return (out, found) if found is not None else None


def _agreed(plan: ir.Plan, described: list[dict]):
    """(indices of the mappings placed, HF key -> (dtype name, shape)): the same on every rank."""
    shapes, refused = {}, set()
    for per_rank in described:
        for i, found in per_rank.items():
            if found is None:
                refused.add(i)
                continue
            for key, value in found.items():
                if shapes.setdefault(key, value) != value:
                    refused.add(i)
    held = {i for per_rank in described for i in per_rank}
    placed = held - refused
    groups = [[i for i, _ in g] for _, g in itertools.groupby(enumerate(plan.mappings),
                                                                 key=lambda item: group_key(item[1]))]
    writers_of: dict[str, set[int]] = {}
    for i, m in enumerate(plan.mappings):
        for s in m.sources:
            writers_of.setdefault(s.key, set()).add(i)
    while True:  # a key is placed whole or not at all, and so is each export group
        dropped = {i for i in placed for s in plan.mappings[i].sources if not writers_of[s.key] <= placed}
        dropped |= {i for g in groups if not set(g) <= placed for i in g if i in placed}
        if not dropped:
            break
        placed -= dropped
    keys = {s.key for i in placed for s in plan.mappings[i].sources}
    return placed, {k: v for k, v in shapes.items() if k in keys}


def _layout(plan: ir.Plan, placed: set[int], shapes: dict, max_shard_bytes: int):
    """(weight map, key -> absolute offset, [(file, header, size)], total bytes) of the placed keys, in plan order."""
    order = list(dict.fromkeys(s.key for i, m in enumerate(plan.mappings) if i in placed for s in m.sources))
    files, current, current_bytes = [], [], 0
    for key in order:
        dtype = dtypes.SAFETENSORS[shapes[key][0]]
        nbytes = math.prod(shapes[key][1]) * dtype.itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            files.append(current)
            current, current_bytes = [], 0
        current.append((key, dtype, tuple(shapes[key][1])))
        current_bytes += nbytes
    if current:
        files.append(current)
    weight_map, offsets, laid_out, total = {}, {}, [], 0
    for n, entries in enumerate(files):
        name = f"{PREFIX}-part{n:05d}.safetensors"
        header, at, size = layout_file(entries)
        laid_out.append((name, header, size))
        offsets.update(at)
        weight_map.update({key: name for key, _, _ in entries})
        total += size - len(header)
    return weight_map, offsets, laid_out, total


def _create(path, size: int) -> None:
    """The file at its size (its header is written by the same rank with the shared blocks, after the direct
    writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _blocks(mapping, relative, tensor, topology, entries, vocab_rows, check_absent) -> list[Read]:
    """This rank's blocks of `mapping` in the files, from its `relative` blocks (`_describe`), its absent parts
    checked on its own slice first."""
    rank, size = tp_of(topology, mapping)
    if mapping.shard.kind == "vocab":
        file, entry = entries(mapping.sources[0].key)
        rows = tensor.shape[0]
        row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
        count = max(0, min(rows, vocab_rows - rank * rows))
        return [Read(file, entry.offset + rank * rows * row_bytes, 0, count * row_bytes)]
    if check_absent:
        checks = [op for op in mapping.mcore_to_hf if isinstance(op, ir.CheckAbsent)]
        for op in checks:
            fill = next(i for i, f in enumerate(o for o in mapping.hf_to_mcore if isinstance(o, ir.FillAbsent))
                        if f.part == op.part)
            dst, src = relative.copies[fill]
            _check_absent(op, {op.part: dst, op.source_part: src if src is not None else dst}, mapping)
    blocks = []
    for r in relative.reads:
        file, entry = entries(r.file)
        blocks.append(Read(file, entry.offset + r.offset, r.into, r.nbytes))
    return list(coalesce(blocks))


def _write_blocks(plan, placed, relative, tensors, topology, staging, weight_map, offsets, shapes, sizes,
                  vocab_rows, check_absent) -> tuple[int, list]:
    """Write this rank's blocks of every placed mapping it writes: the whole 4 KiB blocks of each large one direct
    (`OutputFile.write_blocks`). Returns (the bytes placed, [(file, offset, bytes)] left to write through the page
    cache: small blocks, and the ends of large ones, which share a block with bytes of another write)."""

    def entries(key):
        return weight_map[key], Entry(dtypes.SAFETENSORS[shapes[key][0]], tuple(shapes[key][1]), offsets[key])

    ends, written, current = [], 0, None
    with contextlib.ExitStack() as files:
        outputs = {}
        for i in sorted(placed):
            mapping = plan.mappings[i]
            if mapping.mcore not in tensors:
                continue
            rank, size = tp_of(topology, mapping)
            if not writes_in_place(topology, mapping, size > 1 and mapping.shard.kind != "replicated"):
                continue
            tensor = tensors[mapping.mcore].detach()
            flat = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else None
            buffer = memoryview(flat.numpy()) if flat is not None else None
            for r in _blocks(mapping, relative[i], tensor, topology, entries, vocab_rows, check_absent):
                if r.nbytes == 0:
                    continue
                written += r.nbytes
                if r.nbytes < DIRECT_BYTES:
                    ends.append((r.file, r.offset, buffer[r.into:r.into + r.nbytes]))
                    continue
                if r.file not in outputs:
                    outputs[r.file] = files.enter_context(OutputFile(staging / r.file, sizes[r.file], shared=True))
                if current is not None and current != r.file:
                    outputs[current].end_run()  # one run (one staging buffer) held at a time, not one per file
                current = r.file
                parts = outputs[r.file].write_blocks(r.offset, flat[r.into:r.into + r.nbytes])
                ends += [(r.file, at, memoryview(part.numpy())) for at, part in parts]
                if outputs[r.file].direct:
                    stats.placed_direct_bytes += r.nbytes - sum(part.numel() for _, part in parts)
    return written, ends


def _write_buffered(staging, pieces) -> None:
    """pwrite each (file, offset, memoryview) through the page cache, in batches shared by the writer threads."""
    fds, jobs, batch, batch_bytes = {}, [], [], 0
    try:
        for file, offset, data in pieces:
            if file not in fds:
                fds[file] = os.open(staging / file, os.O_WRONLY)
            for start in range(0, len(data), _BATCH_BYTES):  # a large piece shared by the threads
                part = data[start:start + _BATCH_BYTES]
                batch.append((fds[file], part, offset + start))
                batch_bytes += len(part)
                if batch_bytes >= _BATCH_BYTES:
                    jobs.append(writers().submit(_write_all, batch))
                    batch, batch_bytes = [], 0
        if batch:
            jobs.append(writers().submit(_write_all, batch))
        errors = [job.exception() for job in jobs]  # every write finished (or failed) before the files close
        if any(errors):
            raise next(e for e in errors if e is not None)
    finally:
        for job in jobs:
            job.exception()
        for fd in fds.values():
            os.close(fd)


def _write_all(batch) -> None:
    for fd, data, offset in batch:
        pwrite_all(fd, data, offset)
