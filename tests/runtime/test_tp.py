"""Tensor-parallel slicing and row-range arithmetic (runtime/tp.py) on arange tensors: every element lands where
the layout says, shard-then-concat is the identity for TP in {1, 2, 4, 8}, and the rows a rank reads of each HF part
fuse into exactly its shard."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specbridge.compiler import ir
from specbridge.dsl.diagnostics import Span
from specbridge.errors import ConversionError
from specbridge.runtime import tp
from specbridge.runtime.ops import run_import

SPAN = Span("test.yaml", 1, 1)
TP_SIZES = (1, 2, 4, 8)


def mapping(shard: ir.Shard, layout: ir.Layout | None = None, parts: tuple[str, ...] = ("x",)) -> ir.Mapping:
    sources = tuple(ir.Source(p, f"hf.{p}") for p in parts)
    return ir.Mapping(0, SPAN, "mcore.weight", sources, shard, (ir.Fuse(layout),) if layout is not None else ())


def qkv(groups: int, heads_per_group: int, head_dim: int) -> ir.Mapping:
    """`(g [q: r*d | k: d | v: d]) h`, sharded along g (megatron-core's QKV)."""
    layout = ir.Layout((("g", ir.BRACKET), ("h",)), (("g", groups),),
                       (("q", heads_per_group * head_dim), ("k", head_dim), ("v", head_dim)))
    return mapping(ir.Shard("axis", axis="g", dim=0), layout, ("q", "k", "v"))


def glu() -> ir.Mapping:
    """`([gate | up] f) h`, sharded along f (a gated fc1: rank r holds [gate_r; up_r])."""
    layout = ir.Layout(((ir.BRACKET, "f"), ("h",)), (), (("gate", 1), ("up", 1)))
    return mapping(ir.Shard("axis", axis="f", dim=0), layout, ("gate", "up"))


def grouped_rows(outer: int) -> ir.Mapping:
    """`(o f) h` with o bound, sharded along f: a rank's rows are one range per o."""
    layout = ir.Layout((("o", "f"), ("h",)), (("o", outer),), ())
    return mapping(ir.Shard("axis", axis="f", dim=0), layout)


ROW_PARALLEL = mapping(ir.Shard("axis", dim=1))
COLUMN_PARALLEL = mapping(ir.Shard("axis", dim=0))
VOCAB = mapping(ir.Shard("vocab", dim=0))
REPLICATED = mapping(ir.Shard("replicated"))


def arange(*shape: int) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)


# ---------------------------------------------------------------- every element where the layout says


def test_qkv_shard_holds_whole_query_groups():
    groups, r, d, h = 4, 3, 2, 5
    m = qkv(groups, r, d)
    full = arange(groups * (r + 2) * d, h)
    rows_per_group = (r + 2) * d
    for size in (1, 2, 4):
        for rank in range(size):
            per_rank = groups // size
            expected = full[rank * per_rank * rows_per_group:(rank + 1) * per_rank * rows_per_group]
            assert torch.equal(tp.tp_slice(full, m, rank, size), expected)


def test_glu_shard_is_gate_rows_then_up_rows():
    f, h = 8, 3
    gate, up = arange(f, h), arange(f, h) + 1000
    full = run_import(glu(), {"gate": gate, "up": up})
    for size in (1, 2, 4, 8):
        chunk = f // size
        for rank in range(size):
            expected = torch.cat([gate[rank * chunk:(rank + 1) * chunk], up[rank * chunk:(rank + 1) * chunk]])
            assert torch.equal(tp.tp_slice(full, glu(), rank, size), expected)


def test_row_and_column_parallel_cut_their_dim():
    full = arange(8, 16)
    for rank in range(4):
        assert torch.equal(tp.tp_slice(full, ROW_PARALLEL, rank, 4), full[:, rank * 4:(rank + 1) * 4])
        assert torch.equal(tp.tp_slice(full, COLUMN_PARALLEL, rank, 4), full[rank * 2:(rank + 1) * 2])
        assert torch.equal(tp.tp_slice(full, REPLICATED, rank, 4), full)


def test_below_tp_cuts_the_whole_dim_through_the_group():
    m = qkv(1, 4, 2)  # one KV group on two ranks: megatron-core splits the 12 rows evenly
    assert tp.below_tp(m, 2) and not tp.below_tp(m, 1) and not tp.below_tp(qkv(2, 4, 2), 2)
    assert not tp.below_tp(ROW_PARALLEL, 8) and not tp.below_tp(glu(), 8)
    full = arange(12, 3)
    assert torch.equal(tp.tp_slice(full, m, 0, 2), full[:6])
    assert torch.equal(tp.tp_slice(full, m, 1, 2), full[6:])
    assert torch.equal(tp.tp_concat([full[:6], full[6:]], m), full)


def test_vocab_is_padded_with_zero_rows_and_cut_back():
    vocab, size = 251, 2
    padded = tp.padded_vocab_size(vocab, size)
    full = arange(vocab, 3) + 1
    shards = [tp.tp_slice(full, VOCAB, rank, size, padded_rows=padded) for rank in range(size)]
    assert [s.shape[0] for s in shards] == [padded // size] * size
    assert torch.equal(shards[0], full[:128])
    assert torch.equal(shards[1][:vocab - 128], full[128:]) and not shards[1][vocab - 128:].any()
    assert torch.equal(tp.tp_concat(shards, VOCAB, vocab_rows=vocab), full)
    assert torch.equal(tp.tp_concat([torch.cat([full, full.new_zeros(5, 3)])], VOCAB, vocab_rows=vocab), full)


def test_padded_vocab_size_is_megatrons():
    table = {(251, 1): 256, (251, 2): 256, (333, 2): 512, (397, 2): 512, (256, 2): 256, (128, 2): 256,
             (257, 1): 384, (128256, 4): 128512, (151936, 1): 151936, (151936, 2): 152064}
    assert {k: tp.padded_vocab_size(*k) for k in table} == table


def test_an_axis_tp_does_not_divide_is_an_error():
    try:
        tp.tp_slice(arange(6, 4), COLUMN_PARALLEL, 0, 4)
    except ConversionError as exc:
        assert "does not divide by tensor parallel size 4" in str(exc) and exc.key == "mcore.weight"
    else:
        raise AssertionError("expected a ConversionError")


# ---------------------------------------------------------------- shard then concat is the identity


CASES = st.sampled_from(["qkv", "below_tp", "glu", "grouped", "row", "column", "vocab", "replicated"])


def _case(kind: str, size: int, draw) -> tuple[ir.Mapping, torch.Tensor, dict]:
    small = st.integers(1, 3)
    h = draw(small)
    if kind == "qkv":
        groups, r, d = size * draw(small), draw(small), draw(small)
        return qkv(groups, r, d), arange(groups * (r + 2) * d, h), {}
    if kind == "below_tp":
        r = draw(small)  # head_dim = TP: the group's rows divide by TP, the group count (1) does not
        return qkv(1, r, size), arange((r + 2) * size, h), {}
    if kind == "glu":
        return glu(), arange(2 * size * draw(small), h), {}
    if kind == "grouped":
        outer = draw(small)
        return grouped_rows(outer), arange(outer * size * draw(small), h), {}
    if kind == "row":
        return ROW_PARALLEL, arange(h, size * draw(small)), {}
    if kind == "column":
        return COLUMN_PARALLEL, arange(size * draw(small), h), {}
    if kind == "vocab":
        vocab = draw(st.integers(1, 700))
        return VOCAB, arange(vocab, h), {"vocab_rows": vocab, "padded_rows": tp.padded_vocab_size(vocab, size)}
    return REPLICATED, arange(draw(small), h), {}


@settings(max_examples=100, deadline=None)
@given(kind=CASES, size=st.sampled_from(TP_SIZES), data=st.data())
def test_shard_then_concat_is_the_identity(kind, size, data):
    m, full, vocab = _case(kind, size, data.draw)
    shards = [tp.tp_slice(full, m, rank, size, padded_rows=vocab.get("padded_rows")) for rank in range(size)]
    assert len({s.shape for s in shards}) == 1
    if m.shard.kind == "axis":
        assert sum(s.numel() for s in shards) == full.numel()
        assert sorted(torch.cat([s.flatten() for s in shards]).tolist()) == full.flatten().tolist()
    assert torch.equal(tp.tp_concat(shards, m, vocab_rows=vocab.get("vocab_rows")), full)


# ---------------------------------------------------------------- the rows a rank reads


def _rows(part: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([part[start:stop] for start, stop in ranges])


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(["qkv", "glu", "grouped", "column"]), size=st.sampled_from(TP_SIZES), data=st.data())
def test_rows_read_of_each_part_fuse_into_the_shard(kind, size, data):
    """What the importer does (read `part_row_ranges` of every HF part, fuse them with the `localized` layout) gives
    exactly `tp_slice` of the fused full tensor, element for element."""
    m, full, _ = _case(kind, size, data.draw)
    parts = {name: value for name, value in _split_parts(m, full).items()}
    for rank in range(size):
        read = {name: _rows(value, tp.part_row_ranges(m, name, tuple(value.shape), rank, size))
                for name, value in parts.items()}
        assert torch.equal(run_import(tp.localized(m, size), read), tp.tp_slice(full, m, rank, size))


def _split_parts(m: ir.Mapping, full: torch.Tensor) -> dict[str, torch.Tensor]:
    from specbridge.runtime.ops import split

    return split(m.layout, full) if m.layout is not None else {"x": full}


def test_part_row_ranges_one_range_per_outer_entry():
    m = grouped_rows(3)  # (o f) h, o = 3, f = 4: rank 1 of 2 reads rows 2-3 of each o
    assert tp.part_row_ranges(m, "x", (12, 5), 1, 2) == [(2, 4), (6, 8), (10, 12)]
    assert tp.part_row_ranges(qkv(4, 3, 2), "k", (8, 5), 1, 2) == [(4, 8)]
    assert tp.part_row_ranges(glu(), "up", (8, 5), 3, 4) == [(6, 8)]


def test_shard_extent_names_what_tp_cuts():
    shapes = {"q": (4 * 3 * 2, 5), "k": (4 * 2, 5), "v": (4 * 2, 5)}
    assert tp.shard_extent(qkv(4, 3, 2), 2, shapes) == ("axis 'g'", 4)
    assert tp.shard_extent(qkv(1, 3, 2), 2, {"q": (6, 5), "k": (2, 5), "v": (2, 5)}) == ("dim 0", 10)
    assert tp.shard_extent(glu(), 2, {"gate": (6, 5), "up": (6, 5)}) == ("axis 'f'", 6)


def test_vocab_and_column_ranges():
    assert tp.vocab_row_range(0, 128, 251) == (0, 128)
    assert tp.vocab_row_range(1, 128, 251) == (128, 251)
    assert tp.vocab_row_range(3, 128, 251) == (251, 251)  # all padding
    assert tp.column_range(2, 16) == (32, 48)
