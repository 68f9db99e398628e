"""Pass `invert`: derive every mapping's `mcore_to_hf` program from its `hf_to_mcore` program.

Export is never written by hand: it is the written import program reversed, each op replaced by the inverse its
row in the op table declares (`ops.inverse`): Fuse <-> Split, FillAbsent -> CheckAbsent (assert the policy still
holds, then discard), add(c) -> add(-c), cast -> cast back to the dtype read, scale by a tensor -> divide by that
tensor's Megatron counterpart. An inverse that needs a tensor the Megatron side does not carry is refused here
(and by `check`, which reports the same `uninvertible` problems).

`invert_config` runs the config mapping backwards: the HF config written on export.
"""

from __future__ import annotations

import copy
import dataclasses

from ..dsl.diagnostics import DiagnosticSink
from . import ir, ops


def carried(plan: ir.Plan) -> dict[str, str]:
    """HF key -> Megatron key of every tensor carried as it is (one whole source, no op): what an inverse may
    read on the Megatron side."""
    return {m.sources[0].key: m.mcore for m in plan.mappings
            if len(m.sources) == 1 and m.sources[0].index is None and not m.hf_to_mcore}


def uninvertible(plan: ir.Plan):
    """(span, message) for every op whose inverse needs an HF tensor the Megatron side does not carry."""
    renames = carried(plan)
    for m in plan.mappings:
        for key in ops.needs(m.hf_to_mcore):
            if key not in renames:
                yield m.span, (f"an op of '{m.mcore}' cannot be inverted: its inverse reads '{key}', which no plain "
                               f"rename rule carries to the Megatron side")


def invert(plan: ir.Plan, sources: dict[str, str] | None = None) -> ir.Plan:
    sink = DiagnosticSink(sources or {})
    for span, message in uninvertible(plan):
        sink.error(span, message)
    sink.raise_if_any()
    inversion, inverses = ops.Inversion(carried(plan)), {}
    for m in plan.mappings:  # programs resolve shares between mappings are inverted once
        if id(m.hf_to_mcore) not in inverses:
            inverses[id(m.hf_to_mcore)] = (m.hf_to_mcore, ops.inverse(m.hf_to_mcore, inversion))
    mappings = tuple(dataclasses.replace(m, mcore_to_hf=inverses[id(m.hf_to_mcore)][1]) for m in plan.mappings)
    return dataclasses.replace(plan, mappings=mappings)


def invert_config(plan: ir.Plan, hf_config: dict, sub_config: str | None, megatron_config) -> dict:
    """The HF config for export: `hf_config` (the source's, as a dict; not modified) with every invertible
    transformer entry (`ConfigEntry.hf_path`) written back from the Megatron model's own config, inside the
    sub-config `sub_config` when the architecture has one, and `architectures` set to the plan's."""
    full = copy.deepcopy(hf_config)
    target = full[sub_config] if sub_config and isinstance(full.get(sub_config), dict) else full
    for entry in plan.config:
        if entry.hf_path is None or entry.section != "transformer":
            continue
        value = getattr(megatron_config, entry.field, entry.value)  # a field name (`dsl.parser.field_name`)
        if isinstance(entry.value, bool | int | float | str) and isinstance(value, bool | int | float | str):
            _set_path(target, entry.hf_path, value)
    full["architectures"] = [plan.architecture]
    return full


def _set_path(target: dict, path: str, value) -> None:
    *heads, last = path.split(".")
    for head in heads:
        target = target.setdefault(head, {})
    target[last] = value
