"""Pass `plan`: a deterministic order for the mappings, so that every rank walks the same sequence and memory
stays bounded (non-layer tensors first, then layer by layer; within a layer by rule, then expert)."""

from __future__ import annotations

import dataclasses

from . import ir


def order(plan: ir.Plan) -> ir.Plan:
    return dataclasses.replace(plan, mappings=tuple(sorted(plan.mappings, key=ir.order_key)))
