"""LoRA adapter plans, derived from the base plan: no spec states a rule for an adapter.

For every adapted Megatron linear (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` by default, like PEFT's
`target_modules`; routed experts are not adapted) the base rule that makes its weight from HF linears decides the
adapter, using only the mapping's meaning (sources, layout, shard, absent parts):

- LoRA A (`<linear>.adapter.linear_in.weight`, [rank, in]) is shared by the rule's parts: every HF part's `lora_A`
  is the same matrix (import fuses differing ones exactly by stacking, see `runtime.adapter_io`). It is split by
  tensor parallelism as the base weight's input dim: replicated for a column-parallel linear, along dim 1 for a
  row-parallel one.
- LoRA B (`<linear>.adapter.linear_out.weight`, [out, rank]) has the base weight's output rows: its layout is the
  base layout with the input dim replaced by the rank (QKV per query group with the layer's own geometry, GLU
  fc1 as `[gate | up]`), the same absent parts (`ABSENT_PROJECTION` rows of V on K=V layers) and the same
  column shard; a row-parallel linear keeps B whole.

The derived plan is an ordinary `ir.Plan` over the two adapter manifests (PEFT's adapter keys
`base_model.model.<hf module>.lora_A.weight` / `lora_B.weight`, the Megatron LoRA model's adapter parameters), so the
`check` pass proves its coverage and shapes, and the `invert` pass derives its export programs.
"""

from __future__ import annotations

import dataclasses
import re

from ..dsl.diagnostics import DiagnosticSink
from ..errors import UsageError
from . import ir
from .check import check
from .invert import invert

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # Megatron-Bridge's LoRA default targets
RANK = "lora_rank"  # the layout factor of the adapter rank (inferred from tensors)
PEFT_PREFIX = "base_model.model."
A, B = "A", "B"

_LINEAR = re.compile(r"^(?P<module>.*\.(?P<name>[a-z0-9_]+))\.weight$")


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterTarget:
    """One adapted Megatron linear: the base mapping of its weight and the two derived adapter mappings."""

    base: ir.Mapping
    a: ir.Mapping  # linear_in  <- the parts' lora_A (one shared matrix)
    b: ir.Mapping  # linear_out <- the parts' lora_B, fused by the base layout (rank as the input dim)
    hf_modules: tuple[tuple[str, str], ...]  # (part, HF module name) of the present parts

    @property
    def module(self) -> str:
        """The Megatron linear's global module name."""
        return self.base.mcore.removesuffix(".weight")

    @property
    def parallel(self) -> str:
        """"column" (output dim split by TP), "row" (input dim split) or "replicated"."""
        shard = self.base.shard
        if shard.kind == "replicated":
            return "replicated"
        return "row" if shard.dim == 1 else "column"

    @property
    def absent_parts(self) -> tuple[str, ...]:
        return self.base.absent_parts


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterPlan:
    """The adapter plan of one base plan: its targets in the base plan's order."""

    base: ir.Plan
    targets: tuple[AdapterTarget, ...]

    def as_plan(self) -> ir.Plan:
        """The adapter mappings as an ordinary plan (for the check pass, explain, and the runtime kernels)."""
        mappings = tuple(m for t in self.targets for m in (t.a, t.b))
        return dataclasses.replace(self.base, mappings=mappings, sentinels=(), stacks=())


def peft_key(hf_module: str, which: str) -> str:
    return f"{PEFT_PREFIX}{hf_module}.lora_{which}.weight"


def mcore_key(module: str, which: str) -> str:
    return f"{module}.adapter.linear_{'in' if which == A else 'out'}.weight"


def derive(plan: ir.Plan, targets: tuple[str, ...] = TARGETS, experts: bool = False,
           sources: dict[str, str] | None = None) -> AdapterPlan:
    """The adapter plan for `plan`'s linears named in `targets` (Megatron linear names). A target whose base rule
    does not allow an exact adapter (an op besides fusing, parts fused along the input dim) is an error at the
    rule's span."""
    if experts:
        raise UsageError("LoRA on routed experts is not supported: the HF side holds experts as fused parameters, "
                         "not linear modules PEFT's target_modules can name")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise UsageError(f"unknown LoRA target(s) {unknown}; the adaptable Megatron linears are {list(TARGETS)}")
    sink = DiagnosticSink(sources or {})
    out = []
    for m in plan.mappings:
        match = _LINEAR.match(m.mcore)
        if match is None or match["name"] not in targets or m.expert is not None:
            continue
        target = _derive_one(m, sink)
        if target is not None:
            out.append(target)
    sink.raise_if_any()
    adapter = AdapterPlan(plan, tuple(out))
    inverted = invert(adapter.as_plan()).mappings
    return _with_inverses(adapter, inverted)


def _derive_one(m: ir.Mapping, sink: DiagnosticSink) -> AdapterTarget | None:
    where = f"adapter for '{m.mcore}'"
    if any(s.index is not None or not s.key.endswith(".weight") for s in m.sources):
        sink.error(m.span, f"{where}: the HF side is not a linear module's weight ({m.sources[0].key})")
        return None
    extra = [op for op in m.hf_to_mcore if not isinstance(op, ir.FillAbsent | ir.Fuse | ir.Cast | ir.SplitSource)]
    if extra:
        sink.error(m.span, f"{where} cannot be derived: the base rule applies {type(extra[0]).__name__}, which a "
                           f"low-rank update of the weight would have to follow")
        return None
    layout = m.layout
    if layout is not None and len(layout.dims) != 2:
        sink.error(m.span, f"{where}: the base layout '{layout.text}' is not two-dimensional")
        return None
    if layout is not None and ir.BRACKET in layout.dims[1]:
        sink.error(m.span, f"{where}: the base layout fuses its parts along the input dim, which LoRA's shared A "
                           f"cannot express")
        return None
    if len(m.sources) + len(m.absent_parts) > 1 and m.shard.kind == "axis" and m.shard.dim == 1:
        sink.error(m.span, f"{where}: a fused row-parallel linear has no exact adapter")
        return None
    modules = tuple((s.part, s.key.removesuffix(".weight")) for s in m.sources)
    module = m.mcore.removesuffix(".weight")
    row = m.shard.kind == "axis" and m.shard.dim == 1
    a = ir.Mapping(m.rule, m.span, mcore_key(module, A),
                   tuple(ir.Source(part, peft_key(hf, A)) for part, hf in modules),
                   m.shard if row else ir.Shard("replicated"), (), layer=m.layer, expert=m.expert)
    b_layout = _rank_as_input(layout)
    absent = tuple(op for op in m.hf_to_mcore if isinstance(op, ir.FillAbsent))
    b = ir.Mapping(m.rule, m.span, mcore_key(module, B),
                   tuple(ir.Source(part, peft_key(hf, B)) for part, hf in modules),
                   ir.Shard("replicated") if row else m.shard,
                   (*((ir.SplitSource(_rank_as_input(m.hf_layout)),) if m.hf_layout is not None else ()), *absent,
                    *((ir.Fuse(b_layout),) if b_layout is not None else ())), layer=m.layer, expert=m.expert)
    return AdapterTarget(m, a, b, modules)


def _rank_as_input(layout: ir.Layout | None) -> ir.Layout | None:
    """The base layout with its input dim (dim 1) replaced by the adapter rank."""
    if layout is None:
        return None
    input_axes = set(layout.dims[1])
    sizes = tuple((k, v) for k, v in layout.sizes if k not in input_axes)
    head = layout.text.rsplit(" ", 1)[0] if " " in layout.text else layout.text
    return dataclasses.replace(layout, dims=(layout.dims[0], (RANK,)), sizes=sizes, text=f"{head} {RANK}")


def _with_inverses(adapter: AdapterPlan, inverted: tuple[ir.Mapping, ...]) -> AdapterPlan:
    by_key = {m.mcore: m for m in inverted}
    targets = tuple(dataclasses.replace(t, a=by_key[t.a.mcore], b=by_key[t.b.mcore]) for t in adapter.targets)
    return dataclasses.replace(adapter, targets=targets)


def prove(adapter: AdapterPlan, hf: ir.Manifest, mcore: ir.Manifest, sources: dict[str, str] | None = None) -> None:
    """Coverage and shapes of both adapter manifests (the `check` pass on the derived plan), and invertibility:
    every adapter tensor is reproduced by its derived export program, B's rows are the base weight's rows and
    A's columns its input (a `SpecError` listing every problem otherwise)."""
    check(adapter.as_plan(), hf, mcore, sources)
    sink = DiagnosticSink(sources or {})
    for t in adapter.targets:
        for m in (t.a, t.b):
            if len(m.mcore_to_hf) != len(m.hf_to_mcore):
                sink.error(m.span, f"'{m.mcore}': the derived export program does not invert the import program")
        if t.b.layout is not None and t.b.layout.dims[0] != t.base.layout.dims[0]:
            sink.error(t.base.span, f"'{t.b.mcore}': B's rows do not follow the base weight's layout")
        if t.b.absent_parts != t.base.absent_parts:
            sink.error(t.base.span, f"'{t.b.mcore}': B's absent parts differ from the base weight's")
    _check_rows(adapter, hf, mcore, sink)
    sink.raise_if_any()


def _check_rows(adapter: AdapterPlan, hf: ir.Manifest, mcore: ir.Manifest, sink: DiagnosticSink) -> None:
    """Each adapted tensor's delta B @ A has the shape of its base tensor, on both sides."""
    hf_shapes, mcore_shapes = hf.shapes(), mcore.shapes()
    for t in adapter.targets:
        a, b = mcore_shapes.get(t.a.mcore), mcore_shapes.get(t.b.mcore)
        if a is None or b is None:
            continue  # reported by the coverage check
        if a[0] != b[1]:
            sink.error(t.base.span, f"'{t.module}': adapter ranks disagree (linear_in {list(a)}, linear_out "
                                    f"{list(b)})")
        for part, module in t.hf_modules:
            pa, pb = hf_shapes.get(peft_key(module, A)), hf_shapes.get(peft_key(module, B))
            if pa is not None and pb is not None and pa[0] != pb[1]:
                sink.error(t.base.span, f"'{module}': PEFT adapter ranks disagree (lora_A {list(pa)}, lora_B "
                                        f"{list(pb)})")


def explain(adapter: AdapterPlan, name: str, sources: dict[str, str] | None = None) -> str:
    """`specbridge explain` for an adapter key of either side."""
    from .explain import _describe

    for t in adapter.targets:
        for m, which in ((t.a, A), (t.b, B)):
            if m.mcore == name or any(s.key == name for s in m.sources):
                return "\n".join(_derivation(t, which) + _describe(m, sources or {}))
    raise UsageError(f"'{name}' is no adapter tensor of spec '{adapter.base.spec}' for this config")


def _derivation(t: AdapterTarget, which: str) -> list[str]:
    parts = ", ".join(p for p, _ in t.hf_modules)
    head = f"LoRA {which} of '{t.module}' ({t.parallel}-parallel), derived from the base rule of '{t.base.mcore}'"
    if which == A:
        how = ("shared by the parts " + parts + " (differing lora_A are stacked on import)" if len(t.hf_modules) > 1
               else "the part's lora_A")
        split = "split along the input dim as the base weight" if t.parallel == "row" else "replicated"
        return [head, f"  A: {how}; tensor parallel: {split}"]
    absent = f"; absent parts {', '.join(t.absent_parts)} as in the base rule" if t.absent_parts else ""
    split = "replicated" if t.parallel == "row" else "split like the base weight's rows"
    return [head, f"  B: the base layout with the rank as input dim{absent}; tensor parallel: {split}"]


__all__ = ["AdapterPlan", "AdapterTarget", "TARGETS", "derive", "prove", "explain", "peft_key", "mcore_key"]
