"""The one-way flow dsl -> compiler -> runtime, enforced on the source text of every module."""

import ast
from pathlib import Path

import specbridge

ROOT = Path(specbridge.__file__).parent
FORBIDDEN = {  # specbridge.errors is a leaf every layer may import
    "dsl": ("specbridge.compiler", "specbridge.runtime", ".."),
    "compiler": ("specbridge.runtime", "..runtime"),
    "runtime": ("specbridge.dsl", "..dsl", "...dsl"),
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_layers_import_one_way():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            depth = len(path.relative_to(ROOT / package).parts) - 1
            for name in _imports(path):
                absolute = _absolute(name, package, depth)
                if any(absolute.startswith(f) for f in forbidden if f.startswith("specbridge")):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def _absolute(name: str, package: str, depth: int) -> str:
    if not name.startswith("."):
        return name
    level = len(name) - len(name.lstrip("."))
    parts = ["specbridge", package] + ["?"] * depth
    base = parts[: len(parts) - level + 1] if level > 1 else parts
    return ".".join(base + [name.lstrip(".")]).rstrip(".")


def test_runtime_never_imports_the_parser():
    for path in (ROOT / "runtime").rglob("*.py"):
        assert "expressions" not in path.read_text() or "dsl" not in path.read_text(), path


def test_cpu_workarounds_live_in_one_module():
    hits = [p.name for p in (ROOT / "runtime").rglob("*.py")
            if "torch.cuda.current_device =" in p.read_text() or "record_stream =" in p.read_text()]
    assert hits in ([], ["cpu_compat.py"]), hits
