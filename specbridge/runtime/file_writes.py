"""Writing files from memory: `OutputFile` takes a file of known size whose bytes arrive once each, in any order,
and writes them on a few threads straight to the device (`O_DIRECT`), or through the page cache where the file
system refuses direct I/O.

Why direct: a buffered write has the kernel take a fresh page-cache page for every 4 KiB written. On a virtual
machine whose idle memory the host takes back (this project's CI and bench machines), each such page is a fault
on the host: 1 GiB written into the page cache measured 3.2-3.6 s there, against 0.72-0.78 s written direct,
the copy into the staging buffers included (into pages the guest had just freed, buffered took 0.3-0.5 s). A
direct write also leaves nothing dirty behind: the output is on the device when the command returns, and the
page cache keeps what it held.

How: direct I/O wants offsets, lengths and memory aligned to the device's block. Bytes that continue the previous
write are copied onto the end of a run of page-aligned staging buffers (CHUNK bytes each; up to two per writer
thread kept for reuse, more made when files open at once need them), each written as soon as it is full, so a
shard of many small tensors still goes out in large writes. A write elsewhere (a slice of a stack arriving out of
order) ends the run and starts another.
The bytes of a block shared with bytes not yet written (where a run starts or ends) are assembled in a block of
their own and written once the block is whole. The file's last block is padded and the padding cut off by
truncating the file to its size. A direct write the file system refuses part way (EINVAL) is made through the
page cache instead. A file that several processes write (`shared`, the multi-rank export in place) gets only the
whole blocks each process's bytes fill; the bytes of blocks shared with other writes go back to the caller, to be
written through the page cache once no process writes the file direct any more.

`AppendedFile` is the same for a writer that only appends and knows no size ahead (`torch.save`, the item writer
of `torch.distributed.checkpoint` under megatron-core's checkpoint save): a file-like object whose bytes are one
run of staging buffers, the file sized when it closes.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ALIGN = 4096  # the largest logical block size direct I/O asks offsets, lengths and memory to be a multiple of
CHUNK = 16 << 20  # one staging buffer, written direct once full: a multiple of ALIGN
BUFFERED_BLOCK = 32 << 20  # one buffered write, so that the threads share a large tensor

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: every write is buffered
_pool: ThreadPoolExecutor | None = None
_buffers: queue.SimpleQueue | None = None
_lock = threading.Lock()  # files may be written from several threads (one per checkpoint file)

# `AppendedFile` reads (only) the read-only buffers its writers hand it through a tensor view
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def writers() -> ThreadPoolExecutor:
    """The threads that write blocks of files in parallel (copies and writes release the GIL)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="specbridge-write")
    return _pool


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _take_buffer() -> mmap.mmap:
    """A page-aligned CHUNK-sized staging buffer: a free one when there is one (its pages stay warm), else a new
    one. Never waits: a run holds its buffer until it ends, and files open at once, each with a run, would wait on
    one another for ever. The writes in flight, which hold the rest, are bounded per file (`OutputFile`)."""
    global _buffers
    with _lock:
        if _buffers is None:
            _buffers = queue.SimpleQueue()
    try:
        return _buffers.get_nowait()
    except queue.Empty:
        return mmap.mmap(-1, CHUNK)


def _give_back(buffer: mmap.mmap) -> None:
    """Keep up to two free buffers per writer thread for reuse (one filling while one is written)."""
    if _buffers is not None and _buffers.qsize() < 2 * _threads() and len(buffer) == CHUNK:
        _buffers.put(buffer)  # any other is dropped (unmapped once the last view of it is gone)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _down(offset: int) -> int:
    return offset - offset % ALIGN


def _up(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class OutputFile:
    """A file of `size` bytes, each written once by `write(offset, bytes)` in any order; `with` waits for every
    write and, when the block ends without error, checks that no byte is missing and sets the file's size."""

    def __init__(self, path: str | Path, size: int | None, shared: bool = False):
        """`size` None: a file written front to back whose size is set before it closes (`AppendedFile`).
        `shared`: a file that other processes write too, created and sized by one of them; this process writes
        its bytes with `write_blocks`."""
        self.path, self.size, self.shared = Path(path), size, shared
        self._fd = os.open(path, os.O_WRONLY if shared else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct_fd = self._open_direct()
        if self._direct_fd is None and not shared and size is not None:
            os.ftruncate(self._fd, size)
        self._run: tuple[mmap.mmap, int, int] | None = None  # (staging buffer, its aligned file offset, bytes in)
        self._blocks: dict[int, tuple[mmap.mmap, int]] = {}  # block offset -> (its bytes, how many arrived)
        self._futures: list[Future] = []
        self._in_flight = threading.BoundedSemaphore(2 * _threads())  # bounds the memory queued writes hold

    def _open_direct(self) -> int | None:
        if not _O_DIRECT:
            return None
        try:
            return os.open(self.path, os.O_WRONLY | _O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                raise
            return None

    @property
    def direct(self) -> bool:
        """Whether this file is written direct (False where the file system refuses O_DIRECT)."""
        return self._direct_fd is not None

    def write(self, offset: int, data: torch.Tensor) -> None:
        """The bytes `data` (a flat uint8 tensor) at `offset`. Direct: copied before this returns, into the run of
        staging buffers when they continue the previous write, else into a new run whose head block is assembled.
        Buffered: written from `data` itself, kept alive until then."""
        self._check(offset, data)
        if self._direct_fd is None:
            for i in range(0, data.numel(), BUFFERED_BLOCK):
                self._submit(self._write_buffered, offset + i, data[i:i + BUFFERED_BLOCK])
            return
        if not self._continues(offset):
            head = min(_up(offset) - offset, data.numel())  # up to the next block boundary: shared with others
            self._assemble(offset, data[:head])
            data, offset = data[head:], offset + head
        if data.numel():
            self._extend(offset, data)

    def write_blocks(self, offset: int, data: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """A shared file's bytes `data` at `offset`: the whole blocks among them written direct (staged in runs, as
        `write` does); the bytes at either end, which share a block with bytes of other writes, are returned as
        (offset, bytes) for the caller to write through the page cache once no process writes the file direct any
        more (a buffered write beside direct ones makes the kernel write back and drop the pages it shares with
        them, on every direct write: many times slower). Where there is no direct I/O, written now, buffered."""
        self._check(offset, data)
        end = offset + data.numel()
        first, last = _up(offset), _down(end)
        if self._direct_fd is None:
            self.write(offset, data)
            return []
        if first >= last:
            return [(offset, data)] if data.numel() else []
        ends = [(offset, data[:first - offset])] if first > offset else []
        ends += [(last, data[last - offset:])] if end > last else []
        self._extend(first, data[first - offset:last - offset])
        return ends

    def _check(self, offset: int, data: torch.Tensor) -> None:
        end = offset + data.numel()
        if not 0 <= offset <= end <= (end if self.size is None else self.size):
            raise ValueError(f"bytes {offset}:{end} are outside '{self.path}' ({self.size} bytes)")

    def _continues(self, offset: int) -> bool:
        return self._run is not None and offset == self._run[1] + self._run[2]

    def _extend(self, offset: int, data: torch.Tensor) -> None:
        """Copy `data`, the bytes at `offset` (a block boundary unless they continue the run), onto the end of the
        run, or of a new one; each staging buffer is written once it is full."""
        if not self._continues(offset):
            self.end_run()
            self._run = (_take_buffer(), offset, 0)
        buffer, start, filled = self._run
        pos = 0
        while pos < data.numel():
            count = min(CHUNK - filled, data.numel() - pos)
            torch.frombuffer(buffer, dtype=torch.uint8)[filled:filled + count].copy_(data[pos:pos + count])
            filled, pos = filled + count, pos + count
            if filled == CHUNK:
                self._submit(self._write_direct, buffer, start, CHUNK, True)
                buffer, start, filled = _take_buffer(), start + CHUNK, 0
        self._run = (buffer, start, filled)

    def end_run(self) -> None:
        """Write the run's whole blocks now (its last, partial block is assembled with the bytes that follow it),
        giving its staging buffer back: for a caller moving on to another file. The next write starts a new run."""
        if self._run is None:
            return
        buffer, start, filled = self._run
        self._run = None
        whole = _down(filled)
        if filled > whole:
            self._assemble(start + whole, torch.frombuffer(buffer, dtype=torch.uint8)[whole:filled])
        if whole:
            self._submit(self._write_direct, buffer, start, whole, True)
        else:
            _give_back(buffer)

    def _assemble(self, offset: int, data: torch.Tensor) -> None:
        """Bytes that share their blocks with other writes: kept (in a page-aligned block of their own) until each
        block is whole, then written."""
        pos = 0
        while pos < data.numel():
            block = _down(offset + pos)
            into = offset + pos - block
            count = min(ALIGN - into, data.numel() - pos)
            buffer, arrived = self._blocks.pop(block, None) or (mmap.mmap(-1, ALIGN), 0)
            torch.frombuffer(buffer, dtype=torch.uint8)[into:into + count].copy_(data[pos:pos + count])
            arrived += count
            if arrived == min(ALIGN, self.size - block):
                self._submit(self._write_direct, buffer, block, arrived, False)
            else:
                self._blocks[block] = (buffer, arrived)
            pos += count

    def _submit(self, write, *args) -> None:
        self._in_flight.acquire()
        future = writers().submit(write, *args)
        future.add_done_callback(lambda _: self._in_flight.release())
        self._futures.append(future)

    def _write_direct(self, buffer: mmap.mmap, offset: int, length: int, staging: bool) -> None:
        """Write `length` bytes of an aligned buffer direct (the file's last block padded to ALIGN); a staging
        buffer goes back to the pool after."""
        try:
            with memoryview(buffer) as whole:
                try:
                    pwrite_all(self._direct_fd, whole[:_up(length)], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # refused (an alignment this device does not take): buffered
                        raise
                    pwrite_all(self._fd, whole[:length], offset)
        finally:
            if staging:
                _give_back(buffer)

    def _write_buffered(self, offset: int, data: torch.Tensor) -> None:
        pwrite_all(self._fd, memoryview(data.numpy()), offset)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Wait for every write and close the file; unless `failed`, check it is whole and set its size (a shared
        file: that this process's writes succeeded)."""
        try:
            if not failed:
                self.end_run()
            elif self._run is not None:
                _give_back(self._run[0])
                self._run = None
            errors = [f.exception() for f in self._futures]  # every write finished (or failed) before the close
            if not failed:
                if any(errors):
                    raise next(e for e in errors if e is not None)
                if self._blocks:
                    raise RuntimeError(f"'{self.path}': bytes never written in the blocks at {sorted(self._blocks)}")
                if not self.shared:  # a shared file was sized by its creator; this process padded no block of it
                    os.ftruncate(self._fd, self.size)
        finally:
            os.close(self._fd)
            if self._direct_fd is not None:
                os.close(self._direct_fd)


class AppendedFile(io.RawIOBase):
    """A binary file written front to back (`write` appends, `tell` is the size so far), direct through one run of
    `OutputFile` staging buffers: every write is copied before it returns, so a writer may hand a buffer it reuses
    or frees next (torch.save does). Where the file system has no direct I/O, a plain buffered file."""

    def __init__(self, path: str | Path):
        super().__init__()
        self._out: OutputFile | None = OutputFile(path, None)
        self._plain = None
        if not self._out.direct:
            self._out.close(failed=True)
            self._out, self._plain = None, open(path, "wb")  # noqa: SIM115 (closed by close())
        self._at = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._plain is not None:
            self._plain.write(view)
        elif len(view):
            self._out.write(self._at, torch.frombuffer(view, dtype=torch.uint8))
        self._at += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing to do: staging buffers are written as they fill, the last when the file closes."""

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(failed=exc_type is not None)

    def close(self) -> None:
        self._close(failed=False)

    def _close(self, failed: bool) -> None:
        if self.closed:
            return
        try:
            if self._plain is not None:
                self._plain.close()
            else:
                self._out.size = self._at
                self._out.close(failed=failed)
        finally:
            super().close()
