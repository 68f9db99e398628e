"""Pass `check`: prove a resolved plan against both manifests before any tensor is read.

In: an unchecked `Plan` and the HF and Megatron `Manifest`s of the same config. Out: the plan with its subtrees
expanded against the HF manifest (`ir.expand_subtrees`), or a `SpecError` listing every problem: a tensor on
either side claimed by no rule or by two, a rule naming a tensor the model does not have, a subtree matching
nothing, incomplete stacks, shapes that do not agree with the layout, ops that cannot be inverted. The plan's
`exact` flags are then decided with the HF tensors' dtypes (`ops.exact`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from ..dsl.diagnostics import DiagnosticSink, Span
from . import ir, ops
from .invert import uninvertible
from .layouts import LayoutError, infer_sizes, shape_of, split_shapes


def check(plan: ir.Plan, hf: ir.Manifest, mcore: ir.Manifest, sources: dict[str, str] | None = None) -> ir.Plan:
    sink = DiagnosticSink(sources or {})
    subtrees = plan.subtrees
    hf_keys = hf.shapes()
    for subtree in subtrees:
        if not any(k.startswith(subtree.hf_prefix) for k in hf_keys):
            sink.error(subtree.span, f"subtree '{subtree.hf_prefix}**' matches no hf tensor of {hf.origin}")
    plan = ir.expand_subtrees(plan, hf_keys)
    _check_mcore_coverage(plan, mcore, sink, _Nearest(plan, subtrees, ir.MCORE))
    _check_hf_coverage(plan, hf, sink, _Nearest(plan, subtrees, ir.HF))
    _check_shapes(plan, hf, mcore, sink)
    _check_inverses(plan, sink)
    sink.raise_if_any()
    return _exactness(plan, hf)


def _check_mcore_coverage(plan: ir.Plan, manifest: ir.Manifest, sink: DiagnosticSink, nearest: "_Nearest") -> None:
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
    _uncovered([k for k in have if k not in claimed], ir.MCORE, manifest, sink, nearest)


def _check_hf_coverage(plan: ir.Plan, manifest: ir.Manifest, sink: DiagnosticSink, nearest: "_Nearest") -> None:
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
    _uncovered([k for k in have if k not in uses], ir.HF, manifest, sink, nearest)


# ---------------------------------------------------------------- uncovered names, grouped and located

_INDEX_NAMES = "ijklmn"


def _generalized(key: str) -> tuple[str, tuple[int, ...]]:
    """`model.layers.3.mlp.experts.7.w` -> (`model.layers.{i}.mlp.experts.{j}.w`, (3, 7))."""
    segments, indices = [], []
    for segment in key.split("."):
        if segment.isdigit() and len(indices) < len(_INDEX_NAMES):
            segments.append("{" + _INDEX_NAMES[len(indices)] + "}")
            indices.append(int(segment))
        else:
            segments.append(segment)
    return ".".join(segments), tuple(indices)


def _uncovered(keys, side: str, manifest: ir.Manifest, sink: DiagnosticSink, nearest: "_Nearest") -> None:
    """One diagnostic per name pattern (`model.layers.{i}.self_attn.q_proj.bias x4`), at the nearest rule."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        groups[_generalized(key)[0]].append(key)
    for pattern, members in groups.items():
        shown = f"'{pattern}' x{len(members)}" if len(members) > 1 else f"'{members[0]}'"
        sink.error(nearest(pattern), f"{side} tensor {shown} of {manifest.origin} is covered by no rule "
                                     f"(shown at the nearest rule)")


class _Nearest:
    """The span of the rule whose names (on one side) share the longest run of leading segments with a name, ties
    broken by trailing segments; a subtree's prefix counts as a name of its rule. The spec's top without rules."""

    def __init__(self, plan: ir.Plan, subtrees, side: str):
        self.plan, self.subtrees, self.side, self.spans = plan, subtrees, side, None

    def _candidates(self) -> dict[tuple[str, ...], Span]:
        plan, side, spans = self.plan, self.side, {}
        for m in plan.mappings:
            for key in ([m.mcore] if side == ir.MCORE else [s.key for s in m.sources]):
                spans.setdefault(tuple(_generalized(key)[0].split(".")), m.span)
        for s in plan.sentinels:
            if s.side == side:
                spans.setdefault(tuple(_generalized(s.key)[0].split(".")), s.span)
        for t in self.subtrees:
            spans.setdefault(tuple((t.mcore_prefix if side == ir.MCORE else t.hf_prefix).split(".")[:-1]), t.span)
        return spans

    def __call__(self, pattern: str) -> Span:
        if self.spans is None:
            self.spans = self._candidates()
        segments = pattern.split(".")
        best = max(self.spans, key=lambda c: (_common(c, segments), _common(c[::-1], segments[::-1])), default=None)
        return self.spans[best] if best is not None and _common(best, segments) else Span(self.plan.spec_file, 1, 1)


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
            if m.hf_layout is not None:  # the one HF tensor is fused: its parts by the HF-side layout
                parts = split_shapes(m.hf_layout, next(iter(parts.values())))
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
    for span, message in uninvertible(plan):
        sink.error(span, message)


def _exactness(plan: ir.Plan, hf: ir.Manifest) -> ir.Plan:
    """Each mapping's exactness decided with the dtype its HF tensor has (a cast to a dtype that represents every
    value of it is exact, e.g. bfloat16 -> float32; to int8 or a narrower float it is not)."""
    dtypes = {k: d for k, _, d in hf.tensors}
    mappings = tuple(m if not m.sources else
                     dataclasses.replace(m, exact=ops.exact(m.hf_to_mcore, dtypes.get(m.sources[0].key)))
                     for m in plan.mappings)
    return dataclasses.replace(plan, mappings=mappings)
