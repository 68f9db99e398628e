"""The built-in spec files and how a spec argument (a built-in name, a path, or none: by architecture) is
resolved. Light on purpose (no torch, megatron-core or transformers), so `specbridge compile` starts fast."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from . import compiler
from .errors import UsageError

SPEC_DIR = Path(str(resources.files("specbridge.specs")))


def builtin_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


def spec_for_architecture(architecture: str) -> Path:
    for path in builtin_specs().values():
        spec = compiler.load(path)
        if any(a.name == architecture for a in spec.architectures):
            return path
    raise UsageError(f"no built-in spec serves architecture '{architecture}' "
                     f"(built-in specs: {', '.join(builtin_specs())}); pass --spec")


def resolve_spec_path(spec: str | Path | None, architecture: str | None) -> Path:
    if spec is None:
        if architecture is None:
            raise UsageError("config.json names no architecture; pass --spec")
        return spec_for_architecture(architecture)
    builtin = builtin_specs()
    return builtin[str(spec)] if str(spec) in builtin else Path(spec)
