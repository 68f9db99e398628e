"""Spec files -> `ast.Spec`.

In: a YAML spec (path or text). Out: a fully parsed `ast.Spec` with spans on every node, or a `SpecError` listing
every problem found (YAML structure, unknown keys, expression syntax), each with file:line:col and a caret.
Only syntax and structure are checked here; meaning (names, captures, coverage) is the compiler's job.
"""

from __future__ import annotations

from pathlib import Path

from . import ast
from specbridge.errors import SpecError, UsageError

from .diagnostics import Diagnostic, DiagnosticSink, Span
from .expressions import parse as parse_text
from .yaml_source import Located, load_yaml

TOP_KEYS = {"spec", "doc", "hf", "mcore", "symbols", "requires", "rules"}
HF_KEYS = {"architectures", "formats"}
ARCH_KEYS = {"prefix", "config"}
MCORE_KEYS = {"model", "transformer", "model_args"}
RULE_KEYS = {"mcore", "hf", "when", "layout", "shard", "absent", "ops", "format", "sentinel", "doc"}
SHARDS = ("replicated", "column", "row", "vocab")
SINGLE_PART = "x"


def load_spec(path: str | Path) -> ast.Spec:
    path = Path(path)
    return parse_spec(read_spec_text(path), str(path))


def read_spec_text(path: Path) -> str:
    """The text of a spec file; bytes that are not UTF-8 are a spanned error, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read spec '{path}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8", errors="replace")
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError([Diagnostic(Span(str(path), line, column), "the spec is not UTF-8 text (byte "
                                    f"0x{data[exc.start]:02x})")]) from None


def parse_spec(text: str, file: str = "<spec>") -> ast.Spec:
    sink = DiagnosticSink({file: text})
    root = load_yaml(text, file)
    spec = _SpecReader(sink, file, text).read(root)
    sink.raise_if_any()
    return spec


class _SpecReader:
    def __init__(self, sink: DiagnosticSink, file: str, text: str):
        self.sink, self.file, self.text = sink, file, text

    # ------------------------------------------------------------ helpers
    def mapping(self, node: Located, what: str, allowed: set[str] | None = None) -> dict[str, tuple[Located, Located]]:
        if not isinstance(node.value, dict):
            self.sink.error(node.span, f"{what} must be a mapping")
            return {}
        out = {}
        for key, value in node.value.items():
            name = str(key.value)
            if allowed is not None and name not in allowed:
                self.sink.error(key.span, f"unknown key '{name}' in {what} (expected one of: {', '.join(sorted(allowed))})")
                continue
            if name in out:
                self.sink.error(key.span, f"duplicate key '{name}' in {what} (first at {out[name][0].span})")
                continue
            out[name] = (key, value)
        return out

    def string(self, node: Located, what: str) -> str | None:
        if not isinstance(node.value, str) or not node.value.strip():
            self.sink.error(node.span, f"{what} must be a non-empty string")
            return None
        return node.value

    def field_name(self, node: Located, what: str) -> str | None:
        """A config field name (e.g. `text_config`): an identifier not starting with `_`."""
        value = node.value
        if not isinstance(value, str) or not value.isidentifier() or value.startswith("_"):
            self.sink.error(node.span, f"{what} must be the name of a config field (letters, digits, '_'; not "
                                       f"starting with '_')")
            return None
        return value

    def parse(self, node: Located, start: str, what: str):
        if start == "expr" and isinstance(node.value, (bool, int, float)):
            return ast.Const(node.value, node.span)
        if self.string(node, what) is None:
            return None
        result = parse_text(node, start)
        if isinstance(result, Diagnostic):
            self.sink.diagnostics.append(result)
            return None
        return result

    def required(self, fields: dict, key: str, owner: Located, what: str):
        if key not in fields:
            self.sink.error(owner.span, f"{what} is missing '{key}'")
            return None
        return fields[key][1]

    # ------------------------------------------------------------ sections
    def read(self, root: Located) -> ast.Spec:
        top = self.mapping(root, "spec", TOP_KEYS)
        name_node = self.required(top, "spec", root, "spec")
        name = self.string(name_node, "'spec'") if name_node else None
        architectures, formats = self.hf_section(top.get("hf"), root)
        model, transformer, model_args = self.mcore_section(top.get("mcore"), root)
        symbols = self.symbols(top["symbols"][1]) if "symbols" in top else ()
        rules_node = self.required(top, "rules", root, "spec")
        rules = self.rules(rules_node) if rules_node else ()
        requires = self.requirements(top["requires"][1]) if "requires" in top else ()
        return ast.Spec(name or "?", self.file, self.text, architectures, formats, model or "?", transformer,
                        model_args, symbols, rules, root.span, requires)

    def requirements(self, node: Located):
        if not isinstance(node.value, list):
            self.sink.error(node.span, "'requires' must be a list of predicates")
            return ()
        return tuple(e for e in (self.parse(item, "expr", "requirement") for item in node.value) if e is not None)

    def hf_section(self, entry, root):
        if entry is None:
            self.sink.error(root.span, "spec is missing 'hf'")
            return (), ("default",)
        fields = self.mapping(entry[1], "hf", HF_KEYS)
        archs_node = self.required(fields, "architectures", entry[1], "hf")
        archs = []
        for name, (key, value) in (self.mapping(archs_node, "hf.architectures") if archs_node else {}).items():
            props = self.mapping(value, f"architecture '{name}'", ARCH_KEYS)
            prefix_node = self.required(props, "prefix", value, f"architecture '{name}'")
            prefix = prefix_node.value if prefix_node is not None and isinstance(prefix_node.value, str) else ""
            config = self.field_name(props["config"][1], f"architecture '{name}' config") if "config" in props \
                else None
            archs.append(ast.Architecture(name, prefix, config, key.span))
        formats = ("default",)
        if "formats" in fields:
            node = fields["formats"][1]
            if isinstance(node.value, list) and node.value and all(isinstance(f.value, str) for f in node.value):
                formats = tuple(f.value for f in node.value)
            else:
                self.sink.error(node.span, "hf.formats must be a non-empty list of names")
        return tuple(archs), formats

    def mcore_section(self, entry, root):
        if entry is None:
            self.sink.error(root.span, "spec is missing 'mcore'")
            return None, (), ()
        fields = self.mapping(entry[1], "mcore", MCORE_KEYS)
        model_node = self.required(fields, "model", entry[1], "mcore")
        model = self.string(model_node, "mcore.model") if model_node else None
        transformer = self.config_fields(fields.get("transformer"), "mcore.transformer")
        model_args = self.config_fields(fields.get("model_args"), "mcore.model_args")
        return model, transformer, model_args

    def config_fields(self, entry, what):
        if entry is None:
            return ()
        out = []
        for name, (key, value) in self.mapping(entry[1], what).items():
            expr = self.parse(value, "expr", f"{what}.{name}")
            if expr is not None:
                out.append(ast.ConfigField(name, expr, key.span))
        return tuple(out)

    def symbols(self, node: Located):
        out = []
        for _, (key, value) in self.mapping(node, "symbols").items():
            head = self.parse(key, "symdef", "symbol name")
            expr = self.parse(value, "expr", "symbol")
            if head is not None and expr is not None:
                out.append(ast.SymbolDef(head[0], head[1], expr, key.span))
        return tuple(out)

    def rules(self, node: Located):
        if not isinstance(node.value, list):
            self.sink.error(node.span, "'rules' must be a list")
            return ()
        return tuple(r for r in (self.rule(i, n) for i, n in enumerate(node.value)) if r is not None)

    def rule(self, index: int, node: Located) -> ast.Rule | None:
        fields = self.mapping(node, "rule", RULE_KEYS)
        if not fields:
            if node.value == {}:
                self.sink.error(node.span, "empty rule")
            return None
        get = lambda k: fields[k][1] if k in fields else None  # noqa: E731
        mcore = self.parse(get("mcore"), "pattern", "mcore pattern") if get("mcore") else None
        hf = self.hf_sources(get("hf")) if get("hf") else ()
        sentinel = self.parse(get("sentinel"), "call", "sentinel") if get("sentinel") else None
        if mcore is None and not hf and "mcore" not in fields and "hf" not in fields:
            self.sink.error(node.span, "rule names neither an 'mcore' nor an 'hf' pattern")
        when = self.parse(get("when"), "expr", "when") if get("when") else None
        layout = self.parse(get("layout"), "layout", "layout") if get("layout") else None
        shard_node = get("shard")
        shard = self.string(shard_node, "shard") if shard_node else "replicated"
        absent = self.absent(get("absent")) if get("absent") else ()
        ops = self.ops(get("ops")) if get("ops") else ()
        fmt = self.string(get("format"), "format") if get("format") else None
        return ast.Rule(index, node.span, mcore, hf, when, layout, shard or "replicated",
                        shard_node.span if shard_node else node.span, absent, ops, fmt, sentinel)

    def hf_sources(self, node: Located):
        if isinstance(node.value, str):
            pattern = self.parse(node, "pattern", "hf pattern")
            return ((SINGLE_PART, pattern),) if pattern else ()
        out = []
        for part, (_, value) in self.mapping(node, "hf").items():
            pattern = self.parse(value, "pattern", f"hf pattern of part '{part}'")
            if pattern is not None:
                out.append((part, pattern))
        return tuple(out)

    def absent(self, node: Located):
        out = []
        for part, (_, value) in self.mapping(node, "absent").items():
            call = self.parse(value, "call", "absent")
            if call is not None:
                out.append((part, call))
        return tuple(out)

    def ops(self, node: Located):
        items = node.value if isinstance(node.value, list) else [node]
        return tuple(c for c in (self.parse(item, "call", "op") for item in items) if c is not None)
