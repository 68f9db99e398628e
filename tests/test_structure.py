"""The one-way flow dsl -> compiler -> runtime: imports between layers (on the source text of every module), and
what a fresh interpreter has loaded after importing the runtime or an emitted bridge (no parser, no YAML)."""

import ast
import json
import os
import subprocess
import sys
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


PARSER_MODULES = ("lark", "yaml", "specbridge.dsl.parser", "specbridge.dsl.expressions", "specbridge.dsl.yaml_source")


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    return set(json.loads(out.stdout.splitlines()[-1]))


def _parser_modules(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in PARSER_MODULES))


def test_runtime_and_compiler_import_no_parser():
    runtime = sorted(f"specbridge.runtime.{p.stem}" for p in (ROOT / "runtime").glob("*.py") if p.stem != "__init__")
    loaded = _loaded_after("import specbridge.runtime, specbridge.compiler\n"
                           + "".join(f"import {name}\n" for name in runtime))
    assert set(runtime) <= loaded
    assert not _parser_modules(loaded)


def test_an_emitted_bridge_imports_no_parser(tmp_path):
    from specbridge.compiler import load
    from specbridge.compiler.emit import emit_module

    bridge = tmp_path / "bridge.py"
    bridge.write_text(emit_module(load(ROOT / "specs" / "qwen3_moe.yaml")))
    loaded = _loaded_after(f"import runpy\nassert runpy.run_path({str(bridge)!r})['TEMPLATES'].rules")
    assert "specbridge.runtime.bridge" in loaded
    assert not _parser_modules(loaded)


def test_loading_a_spec_loads_the_parser():  # the probe above would pass vacuously if the names were wrong
    assert {"lark", "specbridge.dsl.parser"} <= set(_parser_modules(_loaded_after(
        "import specbridge.compiler\nspecbridge.compiler.load('specbridge/specs/llama.yaml')")))


def test_cpu_workarounds_live_in_one_module():
    hits = [p.name for p in (ROOT / "runtime").rglob("*.py")
            if "torch.cuda.current_device =" in p.read_text() or "record_stream =" in p.read_text()]
    assert hits in ([], ["cpu_compat.py"]), hits
