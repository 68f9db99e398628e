"""Pass `invert`: derive every mapping's `mcore_to_hf` program from its `hf_to_mcore` program.

Export is never written by hand: it is the written import program reversed, each op replaced by its inverse.
Fuse <-> Split, FillAbsent -> CheckAbsent (assert the policy still holds, then discard), add(c) -> add(-c),
cast -> cast back to the dtype read, scale by a tensor -> divide by that tensor's Megatron counterpart.
"""

from __future__ import annotations

import dataclasses

from . import ir


def invert(plan: ir.Plan) -> ir.Plan:
    mcore_of = {m.sources[0].key: m.mcore for m in plan.mappings if len(m.sources) == 1 and m.layout is None}
    mappings = tuple(dataclasses.replace(m, mcore_to_hf=tuple(_inverse(op, mcore_of) for op in reversed(m.hf_to_mcore)))
                     for m in plan.mappings)
    return dataclasses.replace(plan, mappings=mappings)


def _inverse(op: ir.Op, mcore_of: dict[str, str]) -> ir.Op:
    match op:
        case ir.Fuse(layout=layout):
            return ir.Split(layout)
        case ir.FillAbsent(part=part, policy=policy, source_part=source, span=span):
            return ir.CheckAbsent(part, policy, source, span)
        case ir.AddConst(value=value):
            return ir.AddConst(-value)
        case ir.Cast():
            return ir.Cast("source")
        case ir.ScaleBy(key=key, invert=inv):
            return ir.ScaleBy(mcore_of[key], not inv)
    raise TypeError(f"no inverse for {op!r}")
