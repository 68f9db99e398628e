"""Files written from memory (`file_writes.OutputFile`): direct (O_DIRECT through aligned staging buffers, the
unaligned ends of the pieces assembled in blocks, the last block padded and cut off) or, where the file system
refuses direct I/O, through the page cache; the bytes are the same either way and in any order of arrival. And
files written front to back by a writer that knows no size ahead (`file_writes.AppendedFile`, torch.save)."""

from __future__ import annotations

import errno
import io
import os
import random
import threading

import pytest
import torch
from safetensors.torch import load_file

from specbridge.runtime import file_writes
from specbridge.runtime.file_writes import OutputFile
from specbridge.runtime.safetensors_io import CheckpointWriter, write_safetensors

needs_direct = pytest.mark.skipif(not file_writes._O_DIRECT, reason="the platform has no O_DIRECT")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Direct writes of two blocks at most, so that small pieces straddle chunks; fresh staging buffers."""
    monkeypatch.setattr(file_writes, "CHUNK", 2 * file_writes.ALIGN)
    monkeypatch.setattr(file_writes, "_buffers", None)
    yield
    file_writes._buffers = None  # the next user allocates buffers of the real size


def _tensors():
    generator = torch.Generator().manual_seed(7)
    wide = torch.randn(37, 129, generator=generator).to(torch.bfloat16)
    return {"a.weight": torch.randn(1001, generator=generator),  # 4004 bytes: ends just short of a block
            "b.empty": torch.empty(0, 3),
            "c.transposed": wide.t(),  # not contiguous
            "d.ids": torch.arange(5000, dtype=torch.int64),  # spans several chunks
            "e.byte": torch.tensor([3], dtype=torch.uint8)}  # the file's size is no multiple of anything


def _spy_direct(monkeypatch) -> list[int]:
    """The descriptors opened for direct writes."""
    opened, real = [], OutputFile._open_direct

    def spy(self):
        fd = real(self)
        opened.append(fd)
        return fd

    monkeypatch.setattr(OutputFile, "_open_direct", spy)
    return opened


def _writes(monkeypatch, direct: bool) -> None:
    """Direct writes (skipped where the platform has none), or those of a platform without O_DIRECT."""
    if not direct:
        monkeypatch.setattr(file_writes, "_O_DIRECT", 0)
    elif not file_writes._O_DIRECT:
        pytest.skip("the platform has no O_DIRECT")


def _same(path, tensors) -> bool:
    loaded = load_file(path)
    return loaded.keys() == tensors.keys() and all(
        loaded[k].dtype == t.dtype and torch.equal(loaded[k], t) for k, t in tensors.items())


@needs_direct
def test_direct_write_is_byte_for_byte_the_buffered_one(tmp_path, monkeypatch):
    tensors = _tensors()
    opened = _spy_direct(monkeypatch)
    write_safetensors(tmp_path / "direct.safetensors", tensors, {"format": "pt"})
    assert opened and None not in opened, "the direct path was not taken"
    monkeypatch.setattr(file_writes, "_O_DIRECT", 0)
    write_safetensors(tmp_path / "buffered.safetensors", tensors, {"format": "pt"})
    direct, buffered = (tmp_path / "direct.safetensors").read_bytes(), (tmp_path / "buffered.safetensors").read_bytes()
    assert direct == buffered and len(direct) % file_writes.ALIGN
    assert _same(tmp_path / "direct.safetensors", tensors)


@needs_direct
def test_small_tensors_go_out_in_large_writes(tmp_path, monkeypatch):
    """Tensors that follow one another are copied into one run of staging buffers: a shard of many small tensors
    is written in CHUNK-sized writes, not one or three per tensor."""
    opened, real, writes = _spy_direct(monkeypatch), file_writes.pwrite_all, []

    def count(fd, data, offset):
        if fd in opened:
            writes.append(len(data))
        real(fd, data, offset)

    monkeypatch.setattr(file_writes, "pwrite_all", count)
    tensors = {f"t{i}": torch.randn(250) for i in range(60)}  # 1000 bytes each
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    size = (tmp_path / "m.safetensors").stat().st_size
    assert _same(tmp_path / "m.safetensors", tensors)
    assert len(writes) <= -(-size // file_writes.CHUNK) + 1 and sum(writes) == -(-size // file_writes.ALIGN) * 4096


@pytest.mark.parametrize("direct", [True, False])
def test_pieces_in_any_order_give_the_file(tmp_path, monkeypatch, direct):
    _writes(monkeypatch, direct)
    rng = random.Random(3)
    content = torch.randint(0, 256, (100 + 37 * 1234,), dtype=torch.uint8)
    pieces = [(0, 100)] + [(100 + i * 1234, 1234) for i in range(37)]  # a header, then 37 slices of a stack
    rng.shuffle(pieces)
    with OutputFile(tmp_path / "f", content.numel()) as out:
        for at, n in pieces:
            out.write(at, content[at:at + n].clone())
    assert (tmp_path / "f").read_bytes() == content.numpy().tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_a_shared_file_written_by_two_writers(tmp_path, monkeypatch, direct):
    """Two writers (as two ranks) of one file, pieces interleaved at offsets no block divides: each writes only
    the whole blocks its own bytes fill, direct, and hands back the ends, which written after (buffered) give the
    file; without direct I/O everything is written at once."""
    _writes(monkeypatch, direct)
    content = torch.randint(0, 256, (5 * 4096 + 4 * 10007 + 123,), dtype=torch.uint8)
    cuts = [0, 77, 4096, 4096 + 10007, 4096 + 3 * 10007, 5 * 4096 + 3 * 10007, content.numel()]
    (tmp_path / "f").write_bytes(b"")
    os.truncate(tmp_path / "f", content.numel())  # created and sized by one of the writers
    opened = _spy_direct(monkeypatch)
    ends = []
    writers = [OutputFile(tmp_path / "f", content.numel(), shared=True) for _ in range(2)]
    for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
        for at, part in writers[n % 2].write_blocks(a, content[a:b]):
            assert part.numel() and (at % 4096 or (at + part.numel()) % 4096)  # an end shares a block
            assert at // 4096 == (at + part.numel() - 1) // 4096  # within one block
            ends.append((at, part))
    for w in writers:
        w.close()
    assert (None not in opened) == direct
    assert bool(ends) == direct
    with open(tmp_path / "f", "r+b") as f:
        for at, part in ends:
            f.seek(at)
            f.write(part.numpy().tobytes())
    assert (tmp_path / "f").read_bytes() == content.numpy().tobytes()


def test_more_files_open_than_free_staging_buffers(tmp_path, monkeypatch):
    """Each open file's run holds a staging buffer until it ends: with more files open at once than buffers kept
    for reuse (two for one writer thread), taking a buffer must not wait for one (it would wait for ever)."""
    monkeypatch.setattr(file_writes, "_threads", lambda: 1)
    content = torch.randint(0, 256, (3 * file_writes.ALIGN + 100,), dtype=torch.uint8)
    done = threading.Event()

    def write_all():
        files = [OutputFile(tmp_path / f"f{i}", content.numel()) for i in range(6)]
        for out in files:  # every file's run left open, holding its buffer
            out.write(0, content[:2 * file_writes.ALIGN + 10])
        for out in files:
            out.write(2 * file_writes.ALIGN + 10, content[2 * file_writes.ALIGN + 10:])
            out.close()
        done.set()

    worker = threading.Thread(target=write_all, daemon=True)
    worker.start()
    worker.join(600)  # a hang guard only
    assert done.is_set(), "writers waited on one another for staging buffers"
    assert all((tmp_path / f"f{i}").read_bytes() == content.numpy().tobytes() for i in range(6))
    assert file_writes._buffers.qsize() <= 2  # what is kept for reuse stays bounded


@needs_direct  # buffered writes assemble no blocks: there a gap is a hole of zeros
def test_a_missing_piece_is_caught(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with OutputFile(tmp_path / "f", 3 * 1000) as out:
            out.write(0, torch.zeros(1000, dtype=torch.uint8))
            out.write(2000, torch.zeros(1000, dtype=torch.uint8))


def test_large_stack_written_in_place_out_of_order(tmp_path):
    writer = CheckpointWriter(tmp_path, max_owned_bytes=1 << 10)  # a stack of 5 x 333 floats: written in place
    slices = [torch.randn(333) for _ in range(5)]
    for index in (3, 0, 4, 1, 2):
        done = writer.add_slice("experts.w", index, 5, slices[index])
    writer.add("norm", torch.randn(7))
    weight_map = writer.finish()
    assert done and len(set(weight_map.values())) == 2
    stacked = load_file(tmp_path / weight_map["experts.w"])["experts.w"]
    assert torch.equal(stacked, torch.stack(slices))


def test_file_system_without_direct_io_is_written_through_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flag, *args):
        if flag & file_writes._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flag, *args)

    monkeypatch.setattr(file_writes.os, "open", no_direct)
    opened = _spy_direct(monkeypatch)
    tensors = _tensors()
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    assert opened == [None] and _same(tmp_path / "m.safetensors", tensors)


@needs_direct
def test_direct_write_refused_part_way_is_made_buffered(tmp_path, monkeypatch):
    opened, real = _spy_direct(monkeypatch), file_writes.pwrite_all
    refused = []

    def refuse_direct(fd, data, offset):
        if fd in opened:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    monkeypatch.setattr(file_writes, "pwrite_all", refuse_direct)
    tensors = _tensors()
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    assert refused and _same(tmp_path / "m.safetensors", tensors)


@pytest.mark.parametrize("direct", [True, False])
def test_an_appended_file_holds_what_torch_save_writes(tmp_path, monkeypatch, direct):
    _writes(monkeypatch, direct)
    opened, tensors, expected = _spy_direct(monkeypatch), _tensors(), io.BytesIO()
    torch.save(tensors, expected)
    with file_writes.AppendedFile(tmp_path / "t.pt") as stream:
        torch.save(tensors, stream)
        assert stream.tell() == len(expected.getvalue())
    assert (tmp_path / "t.pt").read_bytes() == expected.getvalue() and len(expected.getvalue()) % file_writes.ALIGN
    assert (opened and None not in opened) == direct
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("direct", [True, False])
def test_an_appended_file_copies_each_write_before_it_returns(tmp_path, monkeypatch, direct):
    """torch.save hands buffers it frees or reuses once `write` returns."""
    _writes(monkeypatch, direct)
    buffer, expected = bytearray(3001), b""
    with file_writes.AppendedFile(tmp_path / "f") as stream:
        for i in range(9):  # 27 009 bytes: across chunks, ending inside a block
            buffer[:] = bytes([i]) * len(buffer)
            assert stream.write(buffer) == len(buffer)
            expected += bytes(buffer)
        stream.write(b"")
    assert (tmp_path / "f").read_bytes() == expected


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_is_not_retried(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(file_writes, "_O_DIRECT", 0)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_writes, "pwrite_all", full)
    with pytest.raises(OSError) as info:
        write_safetensors(tmp_path / "m.safetensors", _tensors(), {"format": "pt"})
    assert info.value.errno == errno.ENOSPC
    if direct and file_writes._O_DIRECT:
        with pytest.raises(OSError) as info, file_writes.AppendedFile(tmp_path / "t.pt") as stream:
            torch.save(_tensors(), stream)
        assert info.value.errno == errno.ENOSPC
