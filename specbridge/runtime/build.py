"""Build this rank's Megatron model chunks for a plan (one chunk per virtual pipeline stage).

Contract: before anything is built, the parallel sizes are checked against the model: TP must divide the attention
heads, the query groups (when there are at least as many) and the MLP width, expert-TP the experts' MLP width,
EP the experts, and every pipeline stage needs a layer (a `UsageError` line, the same on every rank). A builder
gets the plan's TransformerConfig kwargs plus the topology's parallel sizes; an uneven pipeline split when
PP x VPP does not divide the layers (megatron-core's first/last-stage layer counts, said once on rank 0); and the
vocabulary padded as Megatron pads it (`tp.padded_vocab_size`, or the padded size a checkpoint recorded). A spec
`mcore.transformer` field the model's config class has no field for is reported at its place in the spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys

from ..compiler import ir
from ..errors import ConversionError, UsageError
from .models import build_model
from .models.gpt import UnknownConfigField
from .naming import BUILT_HERE
from .parallel import Topology, current_topology
from .tp import padded_vocab_size

UNEVEN_PIPELINE_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                          "pipeline_model_parallel_layout")


def build_chunks(plan: ir.Plan, hf_config, params_dtype=None, extra_transformer: dict | None = None,
                 padded_vocab: int | None = None, topology: Topology | None = None) -> list:
    """This rank's model chunks. `extra_transformer` adds TransformerConfig fields the spec does not set (e.g. an
    uneven pipeline split of one's own); `padded_vocab` is the padded vocabulary a checkpoint was written with."""
    topology = topology or current_topology()
    transformer, model = model_fields(plan, params_dtype, extra_transformer, padded_vocab, topology)
    chunks = []
    for vp_stage in topology.vp_stages():
        try:
            chunk = build_model(plan.model, transformer, model, hf_config=hf_config,
                                pre_process=topology.is_first_stage(vp_stage),
                                post_process=topology.is_last_stage(vp_stage), vp_stage=vp_stage)
        except UnknownConfigField as exc:
            raise _unknown_field_error(plan, exc) from None
        setattr(chunk, BUILT_HERE, True)  # named by its module tree (naming.global_names)
        chunks.append(chunk)
    return chunks


def model_fields(plan: ir.Plan, params_dtype=None, extra_transformer: dict | None = None,
                 padded_vocab: int | None = None, topology: Topology | None = None) -> tuple[dict, dict]:
    """(TransformerConfig kwargs, model kwargs) of this plan's model at `topology`, sizes checked: the spec's
    sections plus the parallel sizes, an uneven pipeline split where needed and the padded vocabulary."""
    topology = topology or current_topology()
    # every tensor is overwritten by an import or a checkpoint load (an unfilled one is an error), so megatron-core's
    # random initialisation is skipped: it dominated build time at real sizes
    transformer = {"perform_initialization": False, **plan.transformer_kwargs(), **(extra_transformer or {})}
    if params_dtype is not None:
        transformer["params_dtype"] = params_dtype
    check_model_sizes(plan, transformer, topology)
    transformer = {**topology.transformer_fields(), **transformer, **_pipeline_fields(plan, transformer, topology)}
    model = plan.model_kwargs()
    if "vocab_size" in model:
        model["vocab_size"] = model_vocab_size(model["vocab_size"], topology.tp_size, padded_vocab)
    return transformer, model


def model_vocab_size(vocab: int, tp_size: int, padded: int | None = None) -> int:
    """The vocabulary rows the Megatron model has: `padded` (recorded by a checkpoint) when given, else `vocab`
    padded as Megatron pads it for this TP size."""
    if padded is None:
        return padded_vocab_size(vocab, tp_size)
    if padded < vocab or padded % tp_size:
        raise UsageError(f"the checkpoint's vocabulary of {vocab} tokens is padded to {padded} rows, which "
                         f"--tp {tp_size} does not divide: use a --tp that divides {padded}", on_every_rank=True)
    return padded


# ---------------------------------------------------------------- sizes


def check_model_sizes(plan: ir.Plan, transformer: dict, topology: Topology) -> None:
    """Refuse parallel sizes this model cannot be split by, in one line naming the flag, the config field, its
    place in the spec and the sizes that would work."""
    spans = {e.field: e.span for e in plan.config if e.section == "transformer"}
    tp, etp, ep = topology.tp_size, topology.etp_size, topology.ep_size
    for flag, size, field in (("--tp", tp, "num_attention_heads"), ("--tp", tp, "ffn_hidden_size"),
                              ("--etp", etp, "moe_ffn_hidden_size"), ("--ep", ep, "num_moe_experts")):
        value = transformer.get(field)
        if isinstance(value, int) and value > 0 and value % size:
            _refuse(flag, size, field, value, spans.get(field))
    groups = transformer.get("num_query_groups")
    if isinstance(groups, int) and groups >= tp and groups % tp:
        _refuse("--tp", tp, "num_query_groups", groups, spans.get("num_query_groups"))
    if ep > 1 and not plan.num_experts:
        raise UsageError(f"--ep {ep} splits experts, and this {plan.spec} model has none: use --ep 1",
                         on_every_rank=True)


def _refuse(flag: str, size: int, field: str, value: int, span) -> None:
    where = f" (mcore.transformer at {span})" if span is not None else ""
    choices = ", ".join(str(d) for d in range(1, value + 1) if value % d == 0 and d <= 64)
    raise UsageError(f"{flag} {size} does not divide {field} = {value}{where}: choose {flag} among {choices}",
                     on_every_rank=True)


# ---------------------------------------------------------------- pipeline


def stage_layers(num_layers: int, pp: int, vpp: int = 1) -> list[int]:
    """Layers per pipeline stage. Even when PP x VPP divides the layers; otherwise as even as megatron-core's
    uneven split allows: the middle stages hold `L // PP` layers (in units of VPP) and the first and last stages
    share the rest, the first taking the larger half."""
    if pp == 1:
        return [num_layers]
    if num_layers % vpp:
        raise UsageError(f"{num_layers} layers do not split into --vpp {vpp} equal virtual stages on each pipeline "
                         f"rank: choose a --vpp that divides {num_layers}", on_every_rank=True)
    units = num_layers // vpp
    if units < pp:
        raise UsageError(f"{num_layers} layers cannot fill --pp {pp} pipeline stages of --vpp {vpp} virtual stages "
                         f"each (every stage needs {vpp} layer(s) at least): use --pp {max(1, units)} or fewer",
                         on_every_rank=True)
    base, rest = divmod(units, pp)
    counts = [base + (rest + 1) // 2] + [base] * (pp - 2) + [base + rest // 2]
    return [c * vpp for c in counts]


def _pipeline_fields(plan: ir.Plan, transformer: dict, topology: Topology) -> dict:
    """megatron-core's first/last-stage layer counts when the layers do not split evenly (unless the caller chose
    a split of their own); said once, on rank 0."""
    if topology.pp_size == 1 or any(transformer.get(f) is not None for f in UNEVEN_PIPELINE_FIELDS):
        return {}
    counts = stage_layers(plan.num_layers, topology.pp_size, topology.vpp_size)
    if len(set(counts)) == 1:
        return {}
    if topology.rank == 0:
        _say_uneven(plan.num_layers, topology.pp_size, topology.vpp_size, tuple(counts))
    return {"num_layers_in_first_pipeline_stage": counts[0], "num_layers_in_last_pipeline_stage": counts[-1]}


@functools.cache
def _say_uneven(num_layers: int, pp: int, vpp: int, counts: tuple[int, ...]) -> None:
    """Once per process and split."""
    virtual = f" x --vpp {vpp}" if vpp > 1 else ""
    print(f"specbridge: {num_layers} layers do not split evenly over --pp {pp}{virtual}; the pipeline stages hold "
          f"{', '.join(map(str, counts))} layers", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- spec fields megatron-core does not know


def _unknown_field_error(plan: ir.Plan, exc: UnknownConfigField) -> Exception:
    """The unknown field as an error at its place in the spec; a field the spec did not set is a bug (`exc`)."""
    spans = {e.field: e.span for e in plan.config if e.section == "transformer"}
    field = next((f for f in exc.fields if f in spans), None)
    if field is None:
        return exc
    close = difflib.get_close_matches(field, _field_names(exc.config_class), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    error = ConversionError(f"spec '{plan.spec}' sets mcore.transformer field '{field}', which megatron-core's "
                            f"{exc.config_class.__name__} does not have{hint}", rule=spans[field])
    error.on_every_rank = True
    return error


def _field_names(config_class) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.init]
