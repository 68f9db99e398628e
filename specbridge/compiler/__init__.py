"""The compiler: spec AST -> checked, invertible, ordered `Plan` for one HF config.

The passes, in order (each a pure function over frozen data):
    parse     dsl.parser.parse_spec               YAML + expressions -> AST with spans
    validate  compiler.validate.validate          config-independent meaning checks
    resolve   compiler.resolve.resolve            bind config, expand captures, per-layer geometry
    check     compiler.check.check                coverage and shapes against both manifests
    invert    compiler.invert.invert              derive mcore_to_hf
    plan      compiler.plan.order                 deterministic, memory-bounded order
    emit      compiler.emit.emit_module           standalone bridge module (`specbridge compile`)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..dsl.parser import parse_spec
from . import ir
from .check import check
from .invert import invert
from .plan import order
from .resolve import resolve
from .validate import validate

PASSES = ("parse", "validate", "resolve", "check", "invert", "plan", "emit")


@functools.lru_cache(maxsize=32)
def _parsed(text: str, file: str):
    return validate(parse_spec(text, file))


def load(path: str | Path):
    """Parse and validate a spec file (cached on its text)."""
    path = Path(path)
    return _parsed(path.read_text(), str(path))


def compile_plan(spec, hf_config, architecture: str | None = None, fmt: str | None = None,
                 manifests: tuple[ir.Manifest, ir.Manifest] | None = None) -> ir.Plan:
    """Resolve, (check when manifests are given), invert and order. Cached on spec digest + config."""
    key = type(hf_config).__qualname__ + json.dumps(_config_dict(hf_config), sort_keys=True, default=str)
    plan = _compiled(spec, key, architecture, fmt, _Opaque(hf_config))
    if manifests is not None:
        check(plan, *manifests, sources=spec.texts)
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
    check_requirements(spec, config.value, architecture)
    return order(invert(resolve(spec, config.value, architecture, fmt)))


def check_requirements(spec, hf_config, architecture: str | None = None) -> None:
    """Refuse a config the spec does not support (e.g. a RoPE scaling it does not model) before anything else:
    a conversion that would be silently wrong is an error naming the requirement."""
    from ..dsl.diagnostics import DiagnosticSink
    from .evaluate import EvalError, Scope, evaluate
    from .resolve import select_architecture, text_config

    sink = DiagnosticSink(spec.texts)
    scope = Scope(text_config(hf_config, select_architecture(spec, hf_config, architecture)),
                  {s.name: s for s in spec.symbols})
    for requirement in spec.requires:
        try:
            if not evaluate(requirement, scope):
                sink.error(requirement.span, "this HF config is not supported by the spec: the requirement is false")
        except EvalError as exc:
            sink.error(exc.span, exc.message)
    sink.raise_if_any()


def _config_dict(hf_config):
    if isinstance(hf_config, dict):
        return hf_config
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config)
