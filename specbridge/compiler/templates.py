"""Rule templates: a spec lowered once (`lower.lower`), parametric in the HF config.

Everything that does not depend on the config is decided here: name templates of both sides, capture domains
(in layer order), the shard, the layout's dims, absent policies, which op each call is, where the config entries
can be written back. What depends on the config is a `Value`: a spec expression (the interpreter evaluates
it) or, in an emitted bridge, a Python function of the config and the captures it names. `resolve` turns
templates and one HF config into a plan; `emit` prints the same templates as Python source. Frozen data only:
no parser, no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..dsl.diagnostics import Span
from . import ir

LAYER, EXPERT = "layer", "expert"


def digest(text: str) -> str:
    """The spec's identity: the first 16 hex digits of its text's SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Value:
    """A config-dependent value: `expr` is a spec expression (`dsl.ast`) or a function `f(cfg, *names)`;
    `span` locates its errors; `names` are the captures and layout sizes it reads (what it may vary with)."""

    expr: object
    span: Span
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Key:
    """A tensor name template: `str.format` text with `{prefix}` and one `{capture}` per capture."""

    text: str

    def format(self, env: dict) -> str:
        """The name for `env`: the capture values and `prefix`."""
        return self.text.format_map(env)


@dataclass(frozen=True, slots=True)
class LayoutTemplate:
    """`ir.Layout` with its sizes still to evaluate: `bindings` in order (each sees the earlier ones), then the
    part sizes (None: one slot)."""

    dims: tuple[tuple[str, ...], ...]
    bindings: tuple[tuple[str, Value], ...]
    parts: tuple[tuple[str, Value | None], ...]
    text: str


@dataclass(frozen=True, slots=True)
class Absent:
    part: str
    policy: str  # "copy_of" | "zeros"
    source_part: str | None
    when: Value | None
    span: Span


@dataclass(frozen=True, slots=True)
class OpCall:
    """One call under `ops:`: the op's row name and its arguments (`Value`s, dtype names, `Key`s)."""

    op: str
    args: tuple
    when: Value | None
    span: Span


@dataclass(frozen=True, slots=True)
class Part:
    """One HF source of a mapping: part `name` is the tensor `key` (slice `[stack]` of it when stacked)."""

    name: str
    key: Key
    stack: str | None = None  # the capture indexing a stacked [N, ...] tensor


@dataclass(frozen=True, slots=True)
class MappingProduct:
    mcore: Key
    sources: tuple[Part, ...]
    shard: ir.Shard
    layout: LayoutTemplate | None = None
    absent: tuple[Absent, ...] = ()
    ops: tuple[OpCall, ...] = ()
    hf_layout: LayoutTemplate | None = None  # the one HF tensor is fused: split into the parts by this layout


@dataclass(frozen=True, slots=True)
class SentinelProduct:
    side: str
    key: Key
    kind: str
    reason: str
    span: Span


@dataclass(frozen=True, slots=True)
class SubtreeProduct:
    hf: Key  # ends with "."
    mcore: Key


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    span: Span
    captures: tuple[tuple[str, object], ...]  # (name, LAYER | EXPERT | enum values), layer first
    product: MappingProduct | SentinelProduct | SubtreeProduct
    when: Value | None = None
    format: str | None = None

    def capture_of(self, kind: str) -> str | None:
        return next((name for name, domain in self.captures if domain == kind), None)


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    prefix: str
    config: str | None  # the sub-config attribute the spec's names refer to (e.g. text_config)


@dataclass(frozen=True, slots=True)
class ConfigTemplate:
    section: str  # "transformer" | "model_args"
    field: str
    value: Value
    hf_path: str | None  # set when the entry can be written back (see ir.ConfigEntry)
    span: Span


@dataclass(frozen=True, slots=True)
class Requirement:
    value: Value
    text: str


@dataclass(frozen=True, slots=True)
class Templates:
    spec: str
    file: str
    digest: str
    model: str
    architectures: tuple[Architecture, ...]
    formats: tuple[str, ...]
    requires: tuple[Requirement, ...]
    config: tuple[ConfigTemplate, ...]
    rules: tuple[Rule, ...]
    symbols: tuple = ()  # `ast.SymbolDef`s the expressions refer to (empty in a bridge: it calls functions)
    span: Span | None = None  # the spec as a whole (where a config-wide refusal is shown)
