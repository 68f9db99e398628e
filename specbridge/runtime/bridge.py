"""What a generated bridge module (`specbridge compile`) imports: the IR types, the invert and order passes, the
op interpreter, and the few helpers its code calls.

A bridge module is the spec compiled to plain Python: it imports this module (and torch), never the spec file,
the YAML or the expression parser. The helpers here mirror the interpreted compiler exactly (`evaluate`
for config reads, `resolve` for architecture selection, sizes and stacks), so that a bridge's `plan()` equals
`specbridge.compiler.compile_plan` for every HF config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping as AbcMapping

from ..compiler.invert import invert
from ..compiler.ir import (
    BRACKET,
    AddConst,
    Cast,
    CheckAbsent,
    ConfigEntry,
    FillAbsent,
    Fuse,
    Layout,
    Mapping,
    Plan,
    ScaleBy,
    Sentinel,
    Shard,
    Source,
    Span,
    Split,
    Subtree,
    expand_subtrees,
    stacks_of,
)
from ..compiler.plan import order
from ..errors import ConversionError
from .ops import run_export, run_import

__all__ = [
    "BRACKET", "AddConst", "Cast", "CheckAbsent", "ConfigEntry", "ConversionError", "FillAbsent", "Fuse", "Layout",
    "Mapping", "Plan", "ScaleBy", "Sentinel", "Shard", "Source", "Span", "Split", "Subtree", "expand_subtrees",
    "field", "invert", "order",
    "pattern_key", "run_export", "run_import", "select_architecture", "size", "stacks_of", "text_config",
]

_MISSING = object()


def _value(config, name: str):
    if isinstance(config, AbcMapping):
        return config.get(name, _MISSING)
    return getattr(config, name, _MISSING)


def field(config, name: str):
    """A field of an HF config object or plain mapping (the spec's bare names and `a.b` attributes)."""
    value = _value(config, name)
    if value is _MISSING:
        raise KeyError(f"'{name}' is not a field of {type(config).__name__}")
    return value


def size(value, name: str) -> int:
    """A layout axis or part size: a positive integer (an integral float is accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"size of '{name}' must be a positive integer, got {value!r}")
    return value


def select_architecture(spec: str, architectures: dict, hf_config, architecture: str | None) -> str:
    """The served architecture named by `architecture`, else by the config's `architectures`, else the first."""
    listed = _value(hf_config, "architectures")
    wanted = architecture or next(iter(listed if listed is not _MISSING and listed else []), None)
    if wanted in architectures:
        return wanted
    if architecture is None and wanted is None and architectures:
        return next(iter(architectures))
    raise ValueError(f"spec '{spec}' does not serve architecture {wanted!r} (it serves: {', '.join(architectures)})")


def text_config(hf_config, attr: str | None):
    """The (sub-)config the spec's names refer to, e.g. `text_config` of a vision-language model."""
    if attr is None:
        return hf_config
    sub = _value(hf_config, attr)
    return hf_config if sub is _MISSING or sub is None else sub


_PIECE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z0-9_\-|]+)?\}")
_PATTERN = re.compile(r"^(?:[A-Za-z0-9_\-]|\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z0-9_\-|]+)?\})+"
                      r"(?:\.(?:[A-Za-z0-9_\-]|\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z0-9_\-|]+)?\})+)*"
                      r"(?:\[\{[A-Za-z_][A-Za-z0-9_]*\}\])?$")


def pattern_key(text: str, prefix: str, captures: dict) -> str:
    """The key a pattern computed at run time names (`scale(by=...)` with a non-literal argument)."""
    text = str(text).replace(" ", "")
    if not _PATTERN.match(text):
        raise ValueError(f"scale(by=...) must name a tensor pattern, got {text!r}")
    text = re.sub(r"\[\{[A-Za-z_][A-Za-z0-9_]*\}\]$", "", text)
    return _PIECE.sub(lambda m: prefix if m.group(1) == "prefix" else str(captures[m.group(1)]), text)
