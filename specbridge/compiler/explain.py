"""`specbridge explain`: how one tensor name, on either side, is derived, in words and programs."""

from __future__ import annotations

from ..errors import UsageError
from . import ir, ops


def _rule_text(span, source: str) -> str:
    lines = source.splitlines()
    return lines[span.line - 1].strip() if 0 < span.line <= len(lines) else ""


def _describe(m: ir.Mapping, source: str) -> list[str]:
    out = [f"rule at {m.span}: {_rule_text(m.span, source)}",
           f"  mcore: {m.mcore}" + (f"   (layer {m.layer})" if m.layer is not None else "")
           + (f" (expert {m.expert})" if m.expert is not None else "")]
    for s in m.sources:
        out.append(f"  hf part '{s.part}': {s.key}" + (f"[{s.index}]" if s.index is not None else ""))
    if m.layout is not None:
        sizes = ", ".join(f"{k}={v}" for k, v in m.layout.sizes)
        parts = " | ".join(f"{p}: {n}" for p, n in m.layout.parts)
        out.append(f"  layout: {m.layout.text}   (parts {parts}{'; ' + sizes if sizes else ''})")
    shard = m.shard.kind if m.shard.kind != "axis" else f"axis '{m.shard.axis or m.shard.dim}' (dim {m.shard.dim})"
    out.append(f"  tensor parallel: {shard}")
    out.append("  hf_to_mcore: " + ops.describe(m.hf_to_mcore))
    out.append("  mcore_to_hf: " + ops.describe(m.mcore_to_hf) + "   (derived)")
    out.append(f"  exact round trip: {'yes' if m.exact else 'up to rounding'}")
    return out


def explain(plan: ir.Plan, name: str, source: str = "") -> str:
    hits = [m for m in plan.mappings if m.mcore == name or any(s.key == name for s in m.sources)]
    lines = [line for m in hits for line in _describe(m, source)]
    for s in plan.sentinels:
        if s.key == name:
            lines.append(f"rule at {s.span}: {s.side} tensor '{s.key}' is {s.kind}: {s.reason}")
    if not lines:
        raise UsageError(f"'{name}' is neither produced nor consumed by spec '{plan.spec}' for this config")
    return "\n".join(lines)
