"""The compiler: spec AST -> checked, invertible, ordered `Plan` for one HF config.

The passes, in order (each a pure function over frozen data):
    parse     dsl.parser.parse_spec               YAML + expressions -> AST with spans
    validate  compiler.validate.validate          config-independent meaning checks
    lower     compiler.lower.lower                AST -> config-parametric rule templates (once per spec)
    resolve   compiler.resolve.resolve            templates x config -> mappings (requirements, captures, sizes)
    check     compiler.check.check                coverage and shapes against both manifests (subtrees expanded)
    invert    compiler.invert.invert              derive mcore_to_hf (each op's inverse from the op table)
    plan      compiler.plan.order                 deterministic, memory-bounded order
    emit      compiler.emit.emit_module           the templates printed as a bridge module (`specbridge compile`)

Importing this package loads no parser: `load` imports it when a spec file is read, so the runtime and emitted
bridges (which import `compiler.ir`, `compiler.resolve`, ...) never load Lark or the YAML reader.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from . import ir
from .check import check
from .invert import invert
from .plan import order
from .resolve import check_requirements, resolve

PASSES = ("parse", "validate", "lower", "resolve", "check", "invert", "plan", "emit")


@functools.lru_cache(maxsize=32)
def _parsed(text: str, file: str, within: str | None):
    from ..dsl.parser import parse_spec
    from .validate import validate

    return validate(parse_spec(text, file, Path(within) if within is not None else None))


def load(path: str | Path, within: str | Path | None = None):
    """Parse and validate a spec file (cached on its text and the texts of the files it `extends`); `within`
    confines its `extends` chain to one directory (and the built-in specs)."""
    from ..dsl.parser import read_spec_text

    path, within = Path(path), None if within is None else str(within)
    spec = _parsed(read_spec_text(path), str(path), within)
    if any(read_spec_text(Path(file)) != text for file, text in spec.sources[:-1]):  # a base changed since
        _parsed.cache_clear()
        spec = _parsed(read_spec_text(path), str(path), within)
    return spec


def compile_plan(spec, hf_config, architecture: str | None = None, fmt: str | None = None,
                 manifests: tuple[ir.Manifest, ir.Manifest] | None = None) -> ir.Plan:
    """Resolve, (check when manifests are given: the plan then has its subtrees expanded against the HF
    manifest), invert and order. Cached on spec digest + config."""
    key = type(hf_config).__qualname__ + json.dumps(_config_dict(hf_config), sort_keys=True, default=str)
    plan = _compiled(spec, key, architecture, fmt, _Opaque(hf_config))
    if manifests is not None:
        plan = check(plan, *manifests, sources=spec.texts)
    return plan


class _Opaque:
    """Carries the config through the cache without taking part in the cache key."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Opaque)


@functools.lru_cache(maxsize=64)
def _compiled(spec, config_key: str, architecture, fmt, config: _Opaque) -> ir.Plan:
    return compile_uncached(spec, config.value, architecture, fmt)


def compile_uncached(spec, hf_config, architecture: str | None = None, fmt: str | None = None) -> ir.Plan:
    """`compile_plan` without its cache (and without manifests): every config read happens."""
    return order(invert(resolve(spec, hf_config, architecture, fmt), spec.texts))


def _config_dict(hf_config):
    if isinstance(hf_config, dict):
        return hf_config
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config)


__all__ = ["PASSES", "check", "check_requirements", "compile_plan", "compile_uncached", "invert", "ir", "load", "order", "resolve"]
