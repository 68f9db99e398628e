"""The IR: what a compiled spec means for one HF config, as frozen data.

A `Mapping` ties one Megatron tensor to the HF tensors it is made of, with the layout that fuses them, the axis
tensor parallelism splits, the absent parts and the numeric ops. Its `hf_to_mcore` program is what the spec wrote;
its `mcore_to_hf` program is derived by the invert pass (the op nodes and what each op means are declared in
`compiler/ops.py`). `Sentinel`s name keys that exist on one side only.
A `Plan` is the checked, ordered result the runtime executes; it never refers back to the parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..dsl.diagnostics import Span
from .layouts import BRACKET, Layout  # noqa: F401  (the layout of a mapping, part of the IR)
from .ops import AddConst, Cast, CheckAbsent, FillAbsent, Fuse, Op, ScaleBy, Split, SplitSource  # noqa: F401  (op nodes)

HF, MCORE = "hf", "mcore"
HF_TO_MCORE, MCORE_TO_HF = "hf_to_mcore", "mcore_to_hf"


@dataclass(frozen=True, slots=True)
class Source:
    """One HF tensor feeding part `part`; `index` selects one slice of a stacked `[N, ...]` tensor."""

    part: str
    key: str
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """How tensor parallelism splits the Megatron tensor: along layout `axis` (found in dim `dim`), or not at all.
    `vocab`: dim 0, padded to the model's padded vocabulary."""

    kind: str  # "replicated" | "axis" | "vocab"
    axis: str | None = None
    dim: int | None = None


@dataclass(frozen=True, slots=True)
class Mapping:
    rule: int
    span: Span
    mcore: str
    sources: tuple[Source, ...]
    shard: Shard
    hf_to_mcore: tuple[Op, ...]
    mcore_to_hf: tuple[Op, ...] = ()
    layer: int | None = None
    expert: int | None = None
    exact: bool = True  # False when an op is exact only up to rounding (`ops.exact`: add, scale, a narrowing cast)

    @property
    def layout(self) -> Layout | None:
        return next((op.layout for op in self.hf_to_mcore if isinstance(op, Fuse)), None)

    @property
    def hf_layout(self) -> Layout | None:
        """The HF-side layout when the one HF tensor is itself fused (`SplitSource`): its parts are the layout's."""
        return next((op.layout for op in self.hf_to_mcore if isinstance(op, SplitSource) and not op.join), None)

    @property
    def absent_parts(self) -> tuple[str, ...]:
        return tuple(op.part for op in self.hf_to_mcore if isinstance(op, FillAbsent))


@dataclass(frozen=True, slots=True)
class Sentinel:
    """A key that exists on one side only, and why: tied, derived or ignored."""

    side: str
    key: str
    kind: str  # "tied" | "derived" | "ignored"
    reason: str
    rule: int
    span: Span


@dataclass(frozen=True, slots=True)
class Subtree:
    """A whole module subtree mapped 1:1 (same tail, same shape, replicated): every HF tensor `hf_prefix + tail`
    is the Megatron tensor `mcore_prefix + tail`. Expanded into ordinary mappings by `expand_subtrees` against
    the HF keys (a manifest or a checkpoint), since the spec does not list the names below the prefix."""

    rule: int
    span: Span
    hf_prefix: str  # ends with "."
    mcore_prefix: str


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """One Megatron config field computed from the HF config; `hf_path` is set when it can be written back."""

    section: str  # "transformer" | "model_args"
    field: str
    value: object
    hf_path: str | None
    span: Span


def stacks_of(mappings) -> tuple[tuple[str, int], ...]:
    """Stacked HF keys (sources with an index) and their lengths."""
    lengths: dict[str, int] = {}
    for m in mappings:
        for s in m.sources:
            if s.index is not None:
                lengths[s.key] = max(lengths.get(s.key, 0), s.index + 1)
    return tuple(sorted(lengths.items()))


@dataclass(frozen=True, slots=True)
class Plan:
    """A spec compiled for one HF config, architecture and on-disk format: checked and ordered."""

    spec: str
    spec_file: str
    digest: str
    architecture: str
    prefix: str
    format: str
    model: str
    config: tuple[ConfigEntry, ...]
    mappings: tuple[Mapping, ...]
    sentinels: tuple[Sentinel, ...]
    num_layers: int
    num_experts: int
    stacks: tuple[tuple[str, int], ...] = field(default=())  # stacked HF keys and their lengths
    subtrees: tuple[Subtree, ...] = field(default=())  # not yet expanded (see `expand_subtrees`)

    def transformer_kwargs(self) -> dict:
        return {e.field: e.value for e in self.config if e.section == "transformer"}

    def model_kwargs(self) -> dict:
        return {e.field: e.value for e in self.config if e.section == "model_args"}

    def by_mcore(self) -> dict[str, Mapping]:
        return {m.mcore: m for m in self.mappings}

    def hf_keys(self) -> set[str]:
        return {s.key for m in self.mappings for s in m.sources if s.part not in m.absent_parts}


def order_key(m: Mapping) -> tuple:
    """The plan order: non-layer tensors first, then layer by layer; within a layer by rule, then expert."""
    return (m.layer is not None, m.layer or 0, m.rule, m.expert or 0, m.mcore)


def expand_subtrees(plan: Plan, hf_keys) -> Plan:
    """`plan` with each subtree replaced by one identity mapping per HF key under its prefix (in plan order).
    Pure; a plan without subtrees is returned as it is."""
    if not plan.subtrees:
        return plan
    keys = sorted(hf_keys)
    extra = [Mapping(t.rule, t.span, t.mcore_prefix + key[len(t.hf_prefix):], (Source("x", key),),
                     Shard("replicated"), ())
             for t in plan.subtrees for key in keys if key.startswith(t.hf_prefix)]
    mappings = tuple(sorted((*plan.mappings, *extra), key=order_key))
    return dataclasses.replace(plan, mappings=mappings, subtrees=())


@dataclass(frozen=True, slots=True)
class Manifest:
    """Every tensor one side has for one config: (key, shape, dtype), from the real model class."""

    side: str
    origin: str  # what was instantiated, e.g. "transformers LlamaForCausalLM (meta device)"
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s, _ in self.tensors}
