"""YAML with positions: a spec file becomes a tree of `Located` values that remember where they came from.

In: YAML text and a file name. Out: nested dicts/lists whose leaves are `Located` scalars (value + span);
mapping keys are `Located` too. A YAML syntax error becomes a `SpecError` pointing at the offending character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .diagnostics import Diagnostic, Span, SpecError


@dataclass(frozen=True, slots=True)
class Located:
    """A YAML value (scalar, dict or list) and the span of its text. `quoted` scalars start one column later."""

    value: Any
    span: Span
    quoted: bool = False

    def text_span(self, line: int, column: int, length: int) -> Span:
        """Span of a character range inside this scalar (1-based line/column relative to the scalar's text)."""
        start = self.span.column + (1 if self.quoted else 0)
        if line == 1:
            return Span(self.span.file, self.span.line, start + column - 1, length)
        return Span(self.span.file, self.span.line + line - 1, column, length)


def _span(node: yaml.Node, file: str) -> Span:
    start, end = node.start_mark, node.end_mark
    length = end.column - start.column if end.line == start.line else 1
    return Span(file, start.line + 1, start.column + 1, max(1, length))


def _convert(node: yaml.Node, file: str, constructor: yaml.constructor.SafeConstructor) -> Located:
    span = _span(node, file)
    if isinstance(node, yaml.MappingNode):
        out: dict[Located, Located] = {}
        for key_node, value_node in node.value:
            key = _convert(key_node, file, constructor)
            out[key] = _convert(value_node, file, constructor)
        return Located(out, span)
    if isinstance(node, yaml.SequenceNode):
        return Located([_convert(n, file, constructor) for n in node.value], span)
    value = constructor.construct_object(node, deep=True)
    return Located(value, span, quoted=node.style in ("'", '"'))


def load_yaml(text: str, file: str) -> Located:
    """Parse YAML text into a `Located` tree; YAML errors are reported with file:line:col and a caret."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = Span(file, mark.line + 1, mark.column + 1) if mark else Span(file, 1, 1)
        raise SpecError([Diagnostic(span, f"invalid YAML: {exc.problem or exc.context}")], {file: text}) from None
    if node is None:
        raise SpecError([Diagnostic(Span(file, 1, 1), "empty spec")], {file: text})
    return _convert(node, file, yaml.constructor.SafeConstructor())


def plain(located: Located) -> Any:
    """Strip positions: the plain Python value of a `Located` tree."""
    value = located.value
    if isinstance(value, dict):
        return {k.value: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
