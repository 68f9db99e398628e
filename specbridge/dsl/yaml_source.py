"""YAML with positions: a spec file becomes a tree of `Located` values that remember where they came from.

In: YAML text and a file name. Out: nested dicts/lists whose leaves are `Located` scalars (value + span);
mapping keys are `Located` too. A YAML syntax error becomes a `SpecError` pointing at the offending character.

The text is untrusted, so the reader is stricter than YAML: no anchors or aliases (no expansion, no "billion
laughs"), only the standard tags of plain data (string, integer, float, boolean, null, list, mapping: no
`!!python/...`, no timestamps or binaries), scalar mapping keys, at most `MAX_DEPTH` levels of nesting, no NUL
or other control characters. Each is a spanned diagnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from specbridge.errors import SpecError

from .diagnostics import Diagnostic, Span

MAX_DEPTH = 32  # nested lists/mappings (a spec nests about six levels)
TAGS = {f"tag:yaml.org,2002:{name}": what for name, what in (
    ("str", "string"), ("int", "integer"), ("float", "float"), ("bool", "boolean"), ("null", "null"),
    ("seq", "list"), ("map", "mapping"))}


@dataclass(frozen=True, slots=True)
class Located:
    """A YAML value (scalar, dict or list) and the span of its text. `quoted` scalars start one column later.

    `raw` is the scalar's source text (quotes included) when it is a one-line quoted scalar, so that columns
    inside it survive escapes (`\\"`, `''`); `body` is where a block scalar's (`|`, `>`) text starts.
    """

    value: Any
    span: Span
    quoted: bool = False
    raw: str | None = None
    body: tuple[int, int] | None = None

    def text_span(self, line: int, column: int, length: int) -> Span:
        """Span of a character range inside this scalar (1-based line/column relative to the scalar's text)."""
        if self.body is not None:
            return Span(self.span.file, self.body[0] + line - 1, self.body[1] + column - 1, length)
        if line == 1 and self.raw is not None:
            start, end = _raw_offset(self.raw, column - 1), _raw_offset(self.raw, column - 1 + length)
            return Span(self.span.file, self.span.line, self.span.column + start, max(1, end - start))
        start = self.span.column + (1 if self.quoted else 0)
        if line == 1:
            return Span(self.span.file, self.span.line, start + column - 1, length)
        return Span(self.span.file, self.span.line + line - 1, column, length)


_ESCAPE_WIDTH = {"x": 4, "u": 6, "U": 10}


def _raw_offset(raw: str, offset: int) -> int:
    """Offset in the quoted source `raw` of the value's character number `offset` (escapes take more room)."""
    pos, seen = 1, 0
    while seen < offset and pos < len(raw) - 1:
        if raw[0] == '"' and raw[pos] == "\\":
            pos += _ESCAPE_WIDTH.get(raw[pos + 1:pos + 2], 2)
        elif raw[0] == "'" and raw[pos:pos + 2] == "''":
            pos += 2
        else:
            pos += 1
        seen += 1
    return pos + (offset - seen)


def _span(node: yaml.Node, file: str) -> Span:
    start, end = node.start_mark, node.end_mark
    length = end.column - start.column if end.line == start.line else 1
    return Span(file, start.line + 1, start.column + 1, max(1, length))


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe composer, refusing anchors, aliases and nesting beyond `MAX_DEPTH` as it reads."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in a "
                                              "spec: write the value out", event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Refused(Exception):
    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span, self.message = span, message


def _convert(node: yaml.Node, file: str, constructor: yaml.constructor.SafeConstructor, text: str) -> Located:
    span = _span(node, file)
    if node.tag not in TAGS:
        tag = node.tag.removeprefix("tag:yaml.org,2002:")
        implicit = isinstance(node, yaml.ScalarNode) and tag in ("timestamp", "binary")
        hint = " (quote it to make it a string)" if implicit else ""
        raise _Refused(span, f"YAML tag '{tag}' is not allowed in a spec (only {', '.join(TAGS.values())}){hint}")
    if isinstance(node, yaml.MappingNode):
        out: dict[Located, Located] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Refused(_span(key_node, file), "a mapping key must be a name, not a list or mapping")
            key = _convert(key_node, file, constructor, text)
            out[key] = _convert(value_node, file, constructor, text)
        return Located(out, span)
    if isinstance(node, yaml.SequenceNode):
        return Located([_convert(n, file, constructor, text) for n in node.value], span)
    try:
        value = constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise _Refused(span, f"invalid YAML value: {exc}") from None
    start, end = node.start_mark, node.end_mark
    quoted = node.style in ("'", '"')
    raw = text[start.index:end.index] if quoted and start.line == end.line else None
    body = _block_body(text, start.line) if node.style in ("|", ">") else None
    return Located(value, span, quoted=quoted, raw=raw, body=body)


def _block_body(text: str, header_line: int) -> tuple[int, int] | None:
    """1-based (line, column) of the first character of a block scalar whose header (`|`, `>-`) is on `header_line`."""
    lines = text.splitlines()
    for number in range(header_line + 1, len(lines)):
        if lines[number].strip():
            return number + 1, len(lines[number]) - len(lines[number].lstrip(" ")) + 1
    return None


def load_yaml(text: str, file: str) -> Located:
    """Parse YAML text into a `Located` tree; YAML errors are reported with file:line:col and a caret."""
    nul = text.find("\x00")
    if nul >= 0:
        raise SpecError([Diagnostic(_position(text, nul, file), "NUL byte in the spec text")], {file: text})
    loader = None
    try:
        loader = _SpecLoader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = Span(file, mark.line + 1, mark.column + 1) if mark else Span(file, 1, 1)
        raise SpecError([Diagnostic(span, f"invalid YAML: {exc.problem or exc.context}")], {file: text}) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError([Diagnostic(_position(text, exc.position, file), f"invalid YAML: character "
                                    f"U+{exc.character:04X} is not allowed")], {file: text}) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise SpecError([Diagnostic(Span(file, 1, 1), "empty spec")], {file: text})
    try:
        return _convert(node, file, yaml.constructor.SafeConstructor(), text)
    except _Refused as exc:
        raise SpecError([Diagnostic(exc.span, exc.message)], {file: text}) from None


def _position(text: str, index: int, file: str) -> Span:
    """The span of character `index` of `text`."""
    line = text.count("\n", 0, index) + 1
    return Span(file, line, index - (text.rfind("\n", 0, index) + 1) + 1)


def plain(located: Located) -> Any:
    """Strip positions: the plain Python value of a `Located` tree."""
    value = located.value
    if isinstance(value, dict):
        return {k.value: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
