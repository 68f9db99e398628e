"""Build this rank's Megatron model chunks for a plan (one chunk per virtual pipeline stage)."""

from __future__ import annotations

from ..compiler import ir
from .models import build_model


def build_chunks(plan: ir.Plan, hf_config, params_dtype=None, extra_transformer: dict | None = None) -> list:
    from megatron.core import parallel_state as ps

    # every tensor is overwritten by an import or a checkpoint load (an unfilled one is an error), so megatron-core's
    # random initialisation is skipped: it dominated build time at real sizes
    transformer = {"perform_initialization": False, **plan.transformer_kwargs(), **(extra_transformer or {})}
    if params_dtype is not None:
        transformer["params_dtype"] = params_dtype
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model(plan.model, transformer, plan.model_kwargs(), hf_config=hf_config,
                                  pre_process=first, post_process=last, vp_stage=vp_stage))
    return chunks
