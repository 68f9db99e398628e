"""The spec AST: frozen dataclasses, each node with the `Span` of the text it came from.

Produced by `dsl.parser`; consumed by the compiler. Nothing here evaluates anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import Span

# ---------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True, slots=True)
class Const:
    value: object  # int, float, str, bool
    span: Span


@dataclass(frozen=True, slots=True)
class ListExpr:
    items: tuple
    span: Span


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # + - * / // % ** == != < <= > >= in and or
    left: object
    right: object
    span: Span


@dataclass(frozen=True, slots=True)
class UnaryOp:
    op: str  # not, -
    operand: object
    span: Span


@dataclass(frozen=True, slots=True)
class IfElse:
    cond: object
    then: object
    other: object
    span: Span


@dataclass(frozen=True, slots=True)
class CallExpr:
    func: object
    args: tuple
    span: Span


@dataclass(frozen=True, slots=True)
class Subscript:
    value: object
    index: object
    span: Span


@dataclass(frozen=True, slots=True)
class Attribute:
    value: object
    attr: str
    span: Span


Expr = Name | Const | ListExpr | BinOp | UnaryOp | IfElse | CallExpr | Subscript | Attribute

# ---------------------------------------------------------------- patterns


@dataclass(frozen=True, slots=True)
class Literal:
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Ref:
    """`{name}`: a capture bound elsewhere in the rule, or a spec parameter such as `prefix`."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Capture:
    """`{name:kind}`: kind is ("layer",), ("expert",) or an enum of literal values."""

    name: str
    kind: tuple[str, ...]
    span: Span


Piece = Literal | Ref | Capture


@dataclass(frozen=True, slots=True)
class Pattern:
    segments: tuple[tuple[Piece, ...], ...]
    stack_index: Ref | None  # `[{e}]`: the tensor is one slice of a stacked [E, ...] tensor
    text: str
    span: Span
    subtree: bool = False  # `a.b.**`: every name below `a.b.` (a subtree rule maps them 1:1)

    def pieces(self):
        for segment in self.segments:
            yield from segment
        if self.stack_index is not None:
            yield self.stack_index


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True, slots=True)
class Axis:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    size: Expr | None  # None: one slot of the bracket (e.g. gate in `([gate | up] f)`)
    span: Span


@dataclass(frozen=True, slots=True)
class Parts:
    parts: tuple[Part, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Layout:
    """Tensor dims, each a product of factors (axes or one bracket of parts), plus axis-size bindings."""

    dims: tuple[tuple[Axis | Parts, ...], ...]
    bindings: tuple[tuple[str, Expr], ...]
    text: str
    span: Span


# ---------------------------------------------------------------- sentinels and ops


@dataclass(frozen=True, slots=True)
class Call:
    """`NAME(args, k=v) [when expr]`: sentinels (ABSENT_PROJECTION, tied, derived, ignored) and ops (add, cast, scale)."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]
    when: Expr | None
    span: Span

    def kwarg(self, key: str):
        return next((v for k, v in self.kwargs if k == key), None)


# ---------------------------------------------------------------- spec


@dataclass(frozen=True, slots=True)
class SymbolDef:
    name: str
    params: tuple[str, ...]
    expr: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str  # transformers class, e.g. Gemma4ForCausalLM
    prefix: str
    config: str | None  # sub-config attribute holding the text config, e.g. text_config
    span: Span


@dataclass(frozen=True, slots=True)
class ConfigField:
    """`mcore_field: expr`. A bare HF name (or dotted path) is invertible: export writes it back."""

    field: str
    expr: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    span: Span
    mcore: Pattern | None
    hf: tuple[tuple[str, Pattern], ...]  # (part name, pattern); a single unnamed source is part "x"
    when: Expr | None
    layout: Layout | None
    shard: str
    shard_span: Span
    absent: tuple[tuple[str, Call], ...]
    ops: tuple[Call, ...]
    format: str | None
    sentinel: Call | None
    hf_layout: Layout | None = None  # the one HF tensor is itself fused: its parts, by this layout


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    file: str
    source: str
    architectures: tuple[Architecture, ...]
    formats: tuple[str, ...]
    model: str
    transformer: tuple[ConfigField, ...]
    model_args: tuple[ConfigField, ...]
    symbols: tuple[SymbolDef, ...]
    rules: tuple[Rule, ...]
    span: Span
    requires: tuple[Expr, ...] = ()  # predicates every supported HF config satisfies
    sources: tuple[tuple[str, str], ...] = ()  # (file, text) of every file merged by `extends`, bases first

    @property
    def texts(self) -> dict[str, str]:
        """Every file's text by file name (for diagnostics: a rule may come from a base spec)."""
        return dict(self.sources) or {self.file: self.source}

    @property
    def merged_source(self) -> str:
        """The text of all the spec's files in merge order (the spec's own text when it extends nothing)."""
        return "\0".join(text for _, text in self.sources) if len(self.sources) > 1 else self.source

    def line(self, span: Span) -> str:
        """The stripped source line a span points at, in whichever file it was written."""
        lines = self.texts.get(span.file, "").splitlines()
        return lines[span.line - 1].strip() if 0 < span.line <= len(lines) else ""
