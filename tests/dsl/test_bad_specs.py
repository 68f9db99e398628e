"""Bad-spec corpus: every file under `bad_specs/` must fail with exactly the diagnostics written inline.

A marker is a trailing YAML comment on the line the diagnostic must point at:

    mcore: "decoder.layers.{i:layers}.x"   # E: capture 'i' has unknown kind
    when: 'a = b'                          # E@col=13: invalid expression

Several markers may share a line. A file whose first line is `# CONFIG: {json}` is also resolved against that
HF config (config-dependent errors are raised by `resolve` only). Every diagnostic must be marked, and every
marker matched by a diagnostic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from specbridge.compiler.resolve import resolve
from specbridge.compiler.validate import validate
from specbridge.errors import SpecError
from specbridge.dsl.parser import parse_spec

CORPUS = Path(__file__).parent / "bad_specs"
FILES = sorted(CORPUS.glob("*.yaml"))
MARKER = re.compile(r"#\s*E(?:@col=(\d+))?:\s*(.*?)\s*(?=#\s*E(?:@col=\d+)?:|$)")
CONFIG = re.compile(r"^#\s*CONFIG:\s*(\{.*\})\s*$")


def expectations(text: str) -> list[tuple[int, int | None, str]]:
    """(line, column or None, message substring) for every marker in the file."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        for col, message in MARKER.findall(line[line.index("# E"):] if "# E" in line else ""):
            out.append((number, int(col) if col else None, message))
    return out


def compile_bad(text: str, file: str):
    spec = validate(parse_spec(text, file))
    first = text.splitlines()[0] if text else ""
    match = CONFIG.match(first)
    if match:
        resolve(spec, json.loads(match.group(1)))


def test_corpus_is_large():
    assert len(FILES) >= 35
    assert sum(len(expectations(f.read_text())) >= 2 for f in FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_bad_spec(path: Path):
    text = path.read_text()
    file = f"bad_specs/{path.name}"
    expected = expectations(text)
    assert expected, f"{path.name} has no '# E:' marker"
    with pytest.raises(SpecError) as info:
        compile_bad(text, file)
    error = info.value
    diagnostics = error.diagnostics
    assert all(d.span.file == file for d in diagnostics)

    for line, col, message in expected:
        hits = [d for d in diagnostics if d.span.line == line and message in d.message
                and (col is None or d.span.column == col)]
        shown = "\n".join(d.render(error.sources) for d in diagnostics)
        assert hits, f"{path.name}:{line}: no diagnostic{'' if col is None else f' at column {col}'} " \
                     f"containing {message!r}; got:\n{shown}"

    marked = {line for line, _, _ in expected}
    stray = [d for d in diagnostics if d.span.line not in marked]
    assert not stray, "unexpected diagnostics:\n" + "\n".join(d.render(error.sources) for d in stray)

    rendered = error.render(limit=100)
    for d in diagnostics:
        assert f"{file}:{d.span.line}:{d.span.column}: error: " in rendered
    lines = rendered.splitlines()
    heads = [k for k, row in enumerate(lines) if row.startswith(f"{file}:")]
    for k in heads:
        assert k + 2 < len(lines) + 1 and lines[k + 2].strip() and set(lines[k + 2].strip()) == {"^"}, \
            f"no caret line under {lines[k]!r}"
