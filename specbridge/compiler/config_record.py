"""The HF config as the spec reads it, recorded: what lets an export compile its plan without transformers.

Importing transformers and its config class costs a command ~1.7 s, more than an export's own work on a ~1 GB
checkpoint. The plan depends on the config only through the fields expressions read (`config_value`), so an
import records them: `record` compiles the plan once more against a `_Recorder` that reads the real config and
notes every field read (value, absence, sub-config, the entries of a per-layer view), then compiles it from the
record alone and keeps the record only if that plan equals the real one. An export compiles from `recorded`, a
`ConfigView` answering the same reads; a read the record does not hold raises `NotRecorded` (the caller then
takes transformers' config). The record also keeps the config's `to_dict()` and `attribute_map`, which the
exported `config.json` is written from.

A record is tied to the spec digest and to the digest of the config it was made from; a record that does not
match them is not used (a plan compiled from it with another spec is dropped by the caller). The checkpoint's metadata is untrusted: `recorded` refuses anything but the shapes
below, and every value it returns is plain JSON data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from ..errors import SpecError
from . import compile_uncached, ir
from .evaluate import MISSING, ConfigView, config_value, is_hf_config

VERSION = 1


class NotRecorded(Exception):
    """A config read the record does not hold."""


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- recording


class _Recorder(ConfigView):
    def __init__(self, config):
        self.config, self.fields = config, {}

    def field(self, name: str):
        if name not in self.fields:
            self.fields[name] = _recorded_value(config_value(self.config, name))
        return self.fields[name][1]


class _SequenceRecorder(Sequence):
    """A config's list view (e.g. `per_layer_config`): its length and the entries read."""

    def __init__(self, view):
        self.view, self.items = view, {}

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index):
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError("a list view is indexed by an integer")
        index = index + len(self) if index < 0 else index
        if index not in self.items:
            if not 0 <= index < len(self):
                raise IndexError(index)
            self.items[index] = _recorded_value(self.view[index])
        return self.items[index][1]


class _Unrecordable(Exception):
    pass


def _recorded_value(value):
    """(placeholder of the value's node, what the expression gets); nodes of sub-configs are filled at the end."""
    if value is MISSING:
        return {"missing": True}, MISSING
    if is_hf_config(value):
        recorder = _Recorder(value)
        return recorder, recorder
    if isinstance(value, Sequence) and not isinstance(value, str | list | tuple):
        recorder = _SequenceRecorder(value)
        return recorder, recorder
    if not _plain(value):
        raise _Unrecordable(type(value).__name__)
    return {"value": value}, value


def _plain(value) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _encode(entry) -> dict:
    """The JSON node of a read: as made, or the reads of a sub-config or list view."""
    if isinstance(entry, _Recorder):
        return {"config": {name: _encode(e) for name, (e, _) in entry.fields.items()}}
    if isinstance(entry, _SequenceRecorder):
        return {"sequence": {"length": len(entry),
                             "items": {str(i): _encode(e) for i, (e, _) in sorted(entry.items.items())}}}
    return entry


def record(spec, hf_config, architecture: str, fmt: str, plan: ir.Plan, source_config: dict) -> dict | None:
    """The record of `hf_config`'s reads for `plan` (compiled from `spec` and that config), or None when the
    config cannot be recorded (a value that is not plain data, a plan with HF subtrees, which need the HF model
    class) or the plan compiled from the record differs from `plan`."""
    if plan.subtrees:
        return None
    recorder = _Recorder(hf_config)
    try:
        if compile_uncached(spec, recorder, architecture, fmt) != plan:
            return None
        full = hf_config.to_dict()
        aliases = dict(getattr(hf_config, "attribute_map", None) or {})
        made = json.loads(json.dumps({"version": VERSION, "spec_digest": plan.digest,
                                      "config_digest": config_digest(source_config), "reads": _encode(recorder),
                                      "to_dict": full, "attribute_map": aliases}))
    except (_Unrecordable, SpecError, TypeError, ValueError):
        return None
    view = recorded(made, source_config)
    try:
        return made if view is not None and compile_uncached(spec, view, architecture, fmt) == plan else None
    except NotRecorded:
        return None


# ---------------------------------------------------------------- reading a record


class RecordedConfig(ConfigView):
    """A config answering the reads of a record; `to_dict()` and `attribute_map` as the recorded config's."""

    def __init__(self, fields: dict, full: dict | None = None, aliases: dict | None = None,
                 spec_digest: str | None = None):
        self._fields, self._full, self.attribute_map, self.spec_digest = fields, full, aliases or {}, spec_digest

    def field(self, name: str):
        if name not in self._fields:
            raise NotRecorded(name)
        return _value(self._fields[name])

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._full))  # a copy: callers may change theirs


class _RecordedSequence(Sequence):
    def __init__(self, length: int, items: dict):
        self._length, self._items = length, items

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError("a list view is indexed by an integer")
        index = index + self._length if index < 0 else index
        if not 0 <= index < self._length:
            raise IndexError(index)
        if str(index) not in self._items:
            raise NotRecorded(f"[{index}]")
        return _value(self._items[str(index)])


def _value(node: dict):
    if "missing" in node:
        return MISSING
    if "value" in node:
        return node["value"]
    if "config" in node:
        return RecordedConfig(node["config"])
    return _RecordedSequence(node["sequence"]["length"], node["sequence"]["items"])


class DamagedRecord(ValueError):
    """A record that is not of the shape `record` writes."""


def recorded(made, source_config: dict) -> RecordedConfig | None:
    """The config view of a record read from a checkpoint's metadata; None when it was made from another config
    (or by another version of the record). A record of the wrong shape raises `DamagedRecord`. The plan compiled
    from it counts only if its spec digest is `spec_digest`'s (the spec may have changed since)."""
    if not isinstance(made, dict) or made.get("version") != VERSION:
        return None
    if made.get("config_digest") != config_digest(source_config):
        return None
    if not isinstance(made.get("spec_digest"), str):
        raise DamagedRecord("'spec_digest' must be a string")
    if not isinstance(made.get("to_dict"), dict) or not isinstance(made.get("attribute_map"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in made["attribute_map"].items()):
        raise DamagedRecord("'to_dict' and 'attribute_map' must be mappings")
    _check_fields(made.get("reads"), depth=0)
    return RecordedConfig(made["reads"]["config"], made["to_dict"], made["attribute_map"], made["spec_digest"])


MAX_NESTING = 16  # sub-configs and list views inside one another (a real config nests two or three)


def _check_fields(node, depth: int) -> None:
    if depth > MAX_NESTING:
        raise DamagedRecord(f"reads nest deeper than {MAX_NESTING} levels")
    if not isinstance(node, dict) or set(node) != {"config"} or not isinstance(node["config"], dict):
        raise DamagedRecord("a config's reads must be {'config': {field: read}}")
    for name, entry in node["config"].items():
        if not isinstance(name, str):
            raise DamagedRecord("a field name must be a string")
        _check_entry(entry, depth)


def _check_entry(entry, depth: int) -> None:
    if isinstance(entry, dict) and set(entry) == {"missing"} and entry["missing"] is True:
        return
    if isinstance(entry, dict) and set(entry) == {"value"}:
        return  # JSON data, as the metadata file's parser made it
    if isinstance(entry, dict) and set(entry) == {"config"}:
        return _check_fields(entry, depth + 1)
    if isinstance(entry, dict) and set(entry) == {"sequence"} and isinstance(entry["sequence"], dict):
        sequence = entry["sequence"]
        length, items = sequence.get("length"), sequence.get("items")
        if set(sequence) == {"length", "items"} and isinstance(length, int) and not isinstance(length, bool) \
                and length >= 0 and isinstance(items, dict) and all(
                    isinstance(k, str) and k.isdigit() and int(k) < length for k in items):
            for item in items.values():
                _check_entry(item, depth + 1)
            return
    raise DamagedRecord(f"a read must be a value, a missing field, a sub-config or a list view, not {entry!r:.80}")


__all__ = ["DamagedRecord", "NotRecorded", "RecordedConfig", "record", "recorded"]
