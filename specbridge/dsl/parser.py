"""Spec files -> `ast.Spec`.

In: a YAML spec (path or text). Out: a fully parsed `ast.Spec` with spans on every node, or a `SpecError` listing
every problem found (YAML structure, unknown keys, expression syntax), each with file:line:col and a caret.
Only syntax and structure are checked here; meaning (names, captures, coverage) is the compiler's job.

`extends: BASE` merges a base spec in before the spec is completed: BASE is a built-in spec name (`llama`) or a
`.yaml` path relative to the extending file. The base (itself possibly extending another; cycles are refused) is
read first, then the file's own declarations are laid over it:

- `spec`, `doc`: the file's own, never inherited;
- `hf.architectures`, `hf.formats`, `mcore.model`: the file's value, when it has one, replaces the base's;
- `mcore.transformer`, `mcore.model_args`, `symbols`: merged by name; the file's entry replaces the base's entry of
  the same name in place, new names follow the base's;
- `requires`: the base's requirements, then the file's (extending a spec can only narrow the configs it accepts);
- `rules`: the base's rules, then the file's (renumbered in that order).

Every node keeps the span of the file it was written in, so diagnostics point at the file and line of each rule;
`Spec.sources` holds the text of every file, and the digest covers them all.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

from . import ast
from specbridge.errors import SpecError, UsageError

from .diagnostics import Diagnostic, DiagnosticSink, Span
from .expressions import parse as parse_text
from .yaml_source import Located, load_yaml

TOP_KEYS = {"spec", "doc", "extends", "hf", "mcore", "symbols", "requires", "rules"}
HF_KEYS = {"architectures", "formats"}
ARCH_KEYS = {"prefix", "config"}
MCORE_KEYS = {"model", "transformer", "model_args"}
RULE_KEYS = {"mcore", "hf", "when", "layout", "hf_layout", "shard", "absent", "ops", "format", "sentinel", "doc"}
SHARDS = ("replicated", "column", "row", "vocab")
SINGLE_PART = "x"
BUILTIN_NAME = re.compile(r"[A-Za-z0-9_]+")
MAX_EXTENDS_DEPTH = 8


def builtin_spec_dir() -> Path:
    return Path(str(resources.files("specbridge.specs")))


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


def parse_spec(text: str, file: str = "<spec>", within: Path | None = None) -> ast.Spec:
    """The spec in `text`; `within` (a directory) confines the files its `extends` chain may name (a spec copy
    read from a checkpoint names only files of that checkpoint, or built-in specs)."""
    sink = DiagnosticSink({file: text})
    root = load_yaml(text, file)
    declared = _declarations(root, file, text, sink, chain=(), within=within)
    spec = _complete(declared, root, sink)
    sink.raise_if_any()
    return spec


@dataclasses.dataclass(frozen=True)
class _Declared:
    """What one file declares, merged over its bases (None: not declared, so inherited)."""

    name: str | None
    architectures: tuple | None
    formats: tuple[str, ...] | None
    model: str | None
    transformer: tuple = ()
    model_args: tuple = ()
    symbols: tuple = ()
    requires: tuple | None = None
    rules: tuple | None = None
    sources: tuple[tuple[str, str], ...] = ()
    hf_span: Span | None = None      # where to report 'hf is missing ...' (None: no file has an hf section)
    mcore_span: Span | None = None
    base_missing: bool = False   # `extends` named no usable base: what is missing is not worth reporting


def _declarations(root: Located, file: str, text: str, sink: DiagnosticSink, chain: tuple[Path, ...],
                  within: Path | None) -> _Declared:
    reader = _SpecReader(sink, file, text)
    own, extends = reader.read(root)
    own = dataclasses.replace(own, sources=((file, text),))
    if extends is None:
        return own
    chain += (Path(file).resolve(),)
    base_file = _base_file(reader, extends, chain, within)
    base_text = _read(base_file, extends, sink) if base_file is not None else None
    if base_text is None:
        return dataclasses.replace(own, base_missing=True)
    sink.sources[str(base_file)] = base_text
    base = _declarations(load_yaml(base_text, str(base_file)), str(base_file), base_text, sink, chain, within)
    return _merge(base, own)


def _read(path: Path, node: Located, sink: DiagnosticSink) -> str | None:
    try:
        return read_spec_text(path)
    except OSError as exc:
        sink.error(node.span, f"'extends': cannot read '{path}': {exc}")
        return None


def _base_file(reader: "_SpecReader", node: Located, chain: tuple[Path, ...], within: Path | None) -> Path | None:
    """The file `extends:` names (a built-in spec name or a `.yaml` path relative to the extending file), or None
    after reporting why it cannot be used."""
    value = reader.string(node, "'extends'")
    if value is None:
        return None
    here = Path(reader.file).parent
    if value.endswith((".yaml", ".yml")):
        path = here / value
    elif BUILTIN_NAME.fullmatch(value):
        builtin = builtin_spec_dir()
        # a built-in spec extending a sibling keeps the sibling's name relative, as the spec itself was named
        path = here / f"{value}.yaml" if here.resolve() == builtin.resolve() else builtin / f"{value}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in builtin.glob("*.yaml")))
            reader.sink.error(node.span, f"'extends': no built-in spec named '{value}' (built-in specs: {names})")
            return None
    else:
        reader.sink.error(node.span, f"'extends' must name a built-in spec or a .yaml file, not '{value}'")
        return None
    outside = within is not None and not path.resolve().is_relative_to(within.resolve())
    if outside and path.resolve().parent != builtin_spec_dir().resolve():
        reader.sink.error(node.span, f"'extends' names '{value}', which is outside '{within}'")
        return None
    if not path.is_file():
        reader.sink.error(node.span, f"'extends': no spec file '{path}'")
        return None
    if path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        reader.sink.error(node.span, f"'extends' makes a cycle: {cycle}")
        return None
    if len(chain) >= MAX_EXTENDS_DEPTH:
        reader.sink.error(node.span, f"'extends' chains more than {MAX_EXTENDS_DEPTH} specs")
        return None
    return path


def _by_name(base: tuple, own: tuple, key) -> tuple:
    """Base entries in order, each replaced by the own entry of the same name; then the own new names."""
    mine = {key(e): e for e in own}
    names = {key(e) for e in base}
    return tuple(mine.get(key(e), e) for e in base) + tuple(e for e in own if key(e) not in names)


def _merge(base: _Declared, own: _Declared) -> _Declared:
    def pick(field):
        mine = getattr(own, field)
        return getattr(base, field) if mine is None else mine

    entry_field = lambda f: f.field  # noqa: E731
    return _Declared(
        name=own.name,
        architectures=pick("architectures"),
        formats=pick("formats"),
        model=pick("model"),
        transformer=_by_name(base.transformer, own.transformer, entry_field),
        model_args=_by_name(base.model_args, own.model_args, entry_field),
        symbols=_by_name(base.symbols, own.symbols, lambda s: s.name),
        requires=(base.requires or ()) + (own.requires or ()),
        rules=None if base.rules is None and own.rules is None else (base.rules or ()) + (own.rules or ()),
        sources=base.sources + own.sources,
        hf_span=own.hf_span if own.hf_span is not None else base.hf_span,
        mcore_span=own.mcore_span if own.mcore_span is not None else base.mcore_span,
    )


def _complete(declared: _Declared, root: Located, sink: DiagnosticSink) -> ast.Spec:
    """The merged declarations as an `ast.Spec`, after checking that the required parts are there."""
    def missing(owner, what, key):
        if not declared.base_missing:
            sink.error(owner, f"{what} is missing '{key}'")

    if declared.name is None:
        missing(root.span, "spec", "spec")
    if declared.architectures is None and declared.hf_span is None:
        missing(root.span, "spec", "hf")
    elif declared.architectures is None:
        missing(declared.hf_span, "hf", "architectures")
    if declared.model is None and declared.mcore_span is None:
        missing(root.span, "spec", "mcore")
    elif declared.model is None:
        missing(declared.mcore_span, "mcore", "model")
    if declared.rules is None:
        missing(root.span, "spec", "rules")
    rules = tuple(dataclasses.replace(r, index=i) for i, r in enumerate(declared.rules or ()))
    file, text = declared.sources[-1]
    return ast.Spec(declared.name or "?", file, text, declared.architectures or (), declared.formats or ("default",),
                    declared.model or "?", declared.transformer, declared.model_args, declared.symbols, rules,
                    root.span, declared.requires or (), declared.sources)


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
    def read(self, root: Located) -> tuple[_Declared, Located | None]:
        """This file's own declarations (required keys are checked after merging) and its `extends` node."""
        top = self.mapping(root, "spec", TOP_KEYS)
        name = (self.string(top["spec"][1], "'spec'") or "?") if "spec" in top else None
        hf = top.get("hf")
        architectures, formats = self.hf_section(hf)
        mcore = top.get("mcore")
        model, transformer, model_args = self.mcore_section(mcore)
        symbols = self.symbols(top["symbols"][1]) if "symbols" in top else ()
        rules = self.rules(top["rules"][1]) if "rules" in top else None
        requires = self.requirements(top["requires"][1]) if "requires" in top else None
        declared = _Declared(name, architectures, formats, model, transformer, model_args, symbols, requires, rules,
                             hf_span=hf[1].span if hf else None, mcore_span=mcore[1].span if mcore else None)
        return declared, top["extends"][1] if "extends" in top else None

    def requirements(self, node: Located):
        if not isinstance(node.value, list):
            self.sink.error(node.span, "'requires' must be a list of predicates")
            return ()
        return tuple(e for e in (self.parse(item, "expr", "requirement") for item in node.value) if e is not None)

    def hf_section(self, entry):
        if entry is None:
            return None, None
        fields = self.mapping(entry[1], "hf", HF_KEYS)
        if "architectures" not in fields:
            archs_node = None
        else:
            archs_node = fields["architectures"][1]
        archs = []
        for name, (key, value) in (self.mapping(archs_node, "hf.architectures") if archs_node else {}).items():
            props = self.mapping(value, f"architecture '{name}'", ARCH_KEYS)
            prefix_node = self.required(props, "prefix", value, f"architecture '{name}'")
            prefix = prefix_node.value if prefix_node is not None and isinstance(prefix_node.value, str) else ""
            config = self.field_name(props["config"][1], f"architecture '{name}' config") if "config" in props \
                else None
            archs.append(ast.Architecture(name, prefix, config, key.span))
        formats = None
        if "formats" in fields:
            node = fields["formats"][1]
            if isinstance(node.value, list) and node.value and all(isinstance(f.value, str) for f in node.value):
                formats = tuple(f.value for f in node.value)
            else:
                self.sink.error(node.span, "hf.formats must be a non-empty list of names")
                formats = ("default",)
        return (tuple(archs) if archs_node is not None else None), formats

    def mcore_section(self, entry):
        if entry is None:
            return None, (), ()
        fields = self.mapping(entry[1], "mcore", MCORE_KEYS)
        model = (self.string(fields["model"][1], "mcore.model") or "?") if "model" in fields else None
        transformer = self.config_fields(fields.get("transformer"), "mcore.transformer")
        model_args = self.config_fields(fields.get("model_args"), "mcore.model_args")
        return model, transformer, model_args

    def config_fields(self, entry, what):
        if entry is None:
            return ()
        out = []
        for name, (key, value) in self.mapping(entry[1], what).items():
            field = self.field_name(key, f"a key of {what}")  # read back from megatron-core's config on export
            expr = self.parse(value, "expr", f"{what}.{name}")
            if field is not None and expr is not None:
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
        hf_layout = self.parse(get("hf_layout"), "layout", "hf_layout") if get("hf_layout") else None
        shard_node = get("shard")
        shard = self.string(shard_node, "shard") if shard_node else "replicated"
        absent = self.absent(get("absent")) if get("absent") else ()
        ops = self.ops(get("ops")) if get("ops") else ()
        fmt = self.string(get("format"), "format") if get("format") else None
        return ast.Rule(index, node.span, mcore, hf, when, layout, shard or "replicated",
                        shard_node.span if shard_node else node.span, absent, ops, fmt, sentinel, hf_layout)

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
