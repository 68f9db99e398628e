"""Where a command's inputs are: checked with the standard library alone, before anything heavy is imported.

The CLI calls these first, so that a wrong path fails in well under a second (torch, megatron-core and
transformers take many seconds to import); the API uses the same functions, so each input has one rule.
Each raises `UsageError` naming the path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UsageError

SPEC_DIR = Path(str(resources.files("specbridge.specs")))


def builtin_specs() -> dict[str, Path]:
    """Built-in spec name -> its file."""
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


def spec_path(spec: str | Path) -> Path:
    """The file of a spec given by built-in name or path."""
    builtin = builtin_specs()
    if str(spec) in builtin:
        return builtin[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"spec '{spec}' is neither a built-in spec ({', '.join(builtin)}) nor a file")
    return path


def hf_config_dir(source: str | Path) -> Path:
    """The directory holding `config.json`, given a checkpoint directory or a config.json path."""
    path = Path(source)
    directory = path.parent if path.is_file() else path
    if not (directory / "config.json").is_file():
        raise UsageError(f"'{path}' does not exist or has no config.json")
    return directory


def existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"'{path}' does not exist or is not a directory")
    return path
