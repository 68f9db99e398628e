"""Pass `check`: prove a resolved plan against both manifests before any tensor is read.

In: an unchecked `Plan` and the HF and Megatron `Manifest`s of the same config. Out: the plan, or a `SpecError`
listing every problem: a tensor on either side claimed by no rule or by two, a rule naming a tensor the model
does not have, incomplete stacks, shapes that do not agree with the layout, ops that cannot be inverted.
"""

from __future__ import annotations

from collections import defaultdict

from ..dsl.diagnostics import DiagnosticSink, Span
from . import ir
from .layouts import LayoutError, infer_sizes, shape_of


def check(plan: ir.Plan, hf: ir.Manifest, mcore: ir.Manifest, sources: dict[str, str] | None = None) -> ir.Plan:
    sink = DiagnosticSink(sources or {})
    top = Span(plan.spec_file, 1, 1)
    _check_mcore_coverage(plan, mcore, sink, top)
    _check_hf_coverage(plan, hf, sink, top)
    _check_shapes(plan, hf, mcore, sink)
    _check_inverses(plan, sink)
    sink.raise_if_any()
    return plan


def _check_mcore_coverage(plan: ir.Plan, manifest: ir.Manifest, sink: DiagnosticSink, top: Span) -> None:
    claimed: dict[str, Span] = {}
    for key, span in [(m.mcore, m.span) for m in plan.mappings] + \
                     [(s.key, s.span) for s in plan.sentinels if s.side == ir.MCORE]:
        if key in claimed:
            sink.error(span, f"mcore tensor '{key}' is claimed twice (also by the rule at {claimed[key]})")
        claimed.setdefault(key, span)
    have = manifest.shapes()
    for key, span in claimed.items():
        if key not in have:
            sink.error(span, f"rule names mcore tensor '{key}', which {manifest.origin} does not have")
    for key in have:
        if key not in claimed:
            sink.error(top, f"mcore tensor '{key}' of {manifest.origin} is covered by no rule")


def _check_hf_coverage(plan: ir.Plan, manifest: ir.Manifest, sink: DiagnosticSink, top: Span) -> None:
    have = manifest.shapes()
    uses: dict[str, list[tuple[int | None, Span]]] = defaultdict(list)
    for m in plan.mappings:
        for s in m.sources:
            uses[s.key].append((s.index, m.span))
    for s in plan.sentinels:
        if s.side == ir.HF:
            uses[s.key].append((None, s.span))
    for key, claims in uses.items():
        if key not in have:
            sink.error(claims[0][1], f"rule names hf tensor '{key}', which {manifest.origin} does not have")
            continue
        _check_claims(key, claims, have[key], sink)
    for key in have:
        if key not in uses:
            sink.error(top, f"hf tensor '{key}' of {manifest.origin} is covered by no rule")


def _check_claims(key: str, claims, shape, sink: DiagnosticSink) -> None:
    indices = [i for i, _ in claims]
    if all(i is None for i in indices):
        if len(claims) > 1:
            sink.error(claims[1][1], f"hf tensor '{key}' is claimed twice (also by the rule at {claims[0][1]})")
        return
    if any(i is None for i in indices):
        sink.error(claims[0][1], f"hf tensor '{key}' is claimed both whole and as a stack")
        return
    if sorted(indices) != list(range(shape[0] if shape else 0)):
        sink.error(claims[0][1], f"stacked hf tensor '{key}' (shape {tuple(shape)}) is covered at indices "
                                 f"{sorted(indices)[:8]}{'...' if len(indices) > 8 else ''}, not exactly once "
                                 f"each of 0..{(shape[0] if shape else 0) - 1}")


def _check_shapes(plan: ir.Plan, hf: ir.Manifest, mcore: ir.Manifest, sink: DiagnosticSink) -> None:
    hf_shapes, mcore_shapes = hf.shapes(), mcore.shapes()
    for m in plan.mappings:
        if m.mcore not in mcore_shapes or any(s.key not in hf_shapes for s in m.sources):
            continue
        parts = {s.part: _part_shape(hf_shapes[s.key], s.index) for s in m.sources}
        target = tuple(mcore_shapes[m.mcore])
        try:
            expected = _fused_shape(m, parts, target)
        except LayoutError as exc:
            sink.error(m.span, f"{m.mcore}: {exc}")
            continue
        if expected != target and not _vocab_padding(m, expected, target):
            shown = ", ".join(f"{s.key}{list(parts[s.part])}" for s in m.sources)
            sink.error(m.span, f"shape mismatch for '{m.mcore}': the hf side ({shown}) gives {list(expected)}, "
                               f"the Megatron model has {list(target)}")


def _vocab_padding(m: ir.Mapping, expected: tuple, target: tuple) -> bool:
    """A vocab-sharded Megatron tensor has the real rows plus padding rows (Megatron pads the vocabulary)."""
    return m.shard.kind == "vocab" and target[1:] == expected[1:] and target[:1] >= expected[:1]


def _part_shape(shape, index):
    return tuple(shape[1:]) if index is not None else tuple(shape)


def _fused_shape(m: ir.Mapping, parts: dict, target: tuple) -> tuple:
    layout = m.layout
    if layout is None:
        return next(iter(parts.values()))
    sizes = dict(layout.sizes)
    for part, shape in parts.items():
        for axis, size in infer_sizes(layout, shape, part).items():
            if sizes.setdefault(axis, size) != size:
                raise LayoutError(f"parts disagree on the size of axis '{axis}' ({sizes[axis]} vs {size})")
    return shape_of(layout, sizes)


def _check_inverses(plan: ir.Plan, sink: DiagnosticSink) -> None:
    """An op whose inverse needs a tensor the other side does not have is refused."""
    renames = {m.sources[0].key: m for m in plan.mappings if len(m.sources) == 1 and m.layout is None and m.exact}
    for m in plan.mappings:
        for op in m.hf_to_mcore:
            if isinstance(op, ir.ScaleBy) and op.key not in renames:
                sink.error(m.span, f"scale(by='{op.key}') cannot be inverted: that tensor is not carried to the "
                                   f"Megatron side by a plain rename rule, so export could not divide by it")
