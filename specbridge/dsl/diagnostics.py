"""Source spans and diagnostics.

Every AST node carries a `Span` (file, 1-based line and column, length). Problems are collected as
`Diagnostic`s and raised together as one `SpecError`, rendered compiler-style:

    specs/gemma4.yaml:42:17: error: capture 'e' is bound on the hf side but unused on the mcore side
        mcore: "decoder.layers.{i}.mlp.experts.linear_fc1.weight"
                        ^^^^^^
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specbridge.errors import SpecError


@dataclass(frozen=True, slots=True)
class Span:
    file: str
    line: int
    column: int
    length: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def shifted(self, column_offset: int, length: int) -> "Span":
        """A span inside this one, `column_offset` characters to the right (same line)."""
        return Span(self.file, self.line, self.column + column_offset, max(1, length))


UNKNOWN_SPAN = Span("<unknown>", 0, 0)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    span: Span
    message: str
    severity: str = "error"

    def render(self, sources: dict[str, str]) -> str:
        head = f"{self.span}: {self.severity}: {self.message}"
        text = sources.get(self.span.file)
        if text is None or self.span.line < 1:
            return head
        lines = text.splitlines()
        if self.span.line > len(lines):
            return head
        src = lines[self.span.line - 1]
        caret = " " * (self.span.column - 1) + "^" * max(1, min(self.span.length, len(src) - self.span.column + 1))
        return f"{head}\n    {src}\n    {caret}"


@dataclass
class DiagnosticSink:
    """Collects diagnostics during one stage; `raise_if_any` ends the stage."""

    sources: dict[str, str] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, span: Span, message: str) -> None:
        self.diagnostics.append(Diagnostic(span, message))

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise SpecError(self.diagnostics, self.sources)
