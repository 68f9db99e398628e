"""Megatron-core model builders, by name.

Contract: `BUILDERS` maps a spec's `mcore.model` name to a function
`(transformer: dict, model: dict, *, hf_config, pre_process, post_process, vp_stage) -> torch.nn.Module`
that builds this rank's model chunk (parallel state must be initialised). `transformer` and `model` are the plan's
config sections (the spec's `mcore.transformer` / `mcore.model_args`, evaluated for the checkpoint's config, plus
the caller's dtype and pipeline overrides); they carry everything the decoder needs. `hf_config` is the
checkpoint's whole HF config, for sub-modules taken as they are from transformers (e.g. Gemma 4's vision and audio
towers); a builder that needs none ignores it. `pre_process` / `post_process` / `vp_stage` place the chunk in the
pipeline. It is a plain dict: other modules register their builders by adding to it. `SAMPLE_INPUTS` gives, for
models that take more than token ids, the inputs a parity check feeds both sides (`sample_inputs`).
"""

from __future__ import annotations

from specbridge.errors import UsageError
from specbridge.runtime.models import gemma4_towers
from specbridge.runtime.models.gemma4 import build_gemma4
from specbridge.runtime.models.gpt import build_gpt

BUILDERS = {"gpt": build_gpt, "gemma4": build_gemma4}
# models that take more than token ids: `(hf_config, ids, generator) -> SampleInputs` for parity checks
SAMPLE_INPUTS = {"gemma4": gemma4_towers.sample_inputs}


def sample_inputs(name: str, hf_config, ids, generator) -> gemma4_towers.SampleInputs:
    """Inputs for every modality the model `name` with `hf_config` takes (token ids alone for most)."""
    if name in SAMPLE_INPUTS:
        return SAMPLE_INPUTS[name](hf_config, ids, generator)
    return gemma4_towers.SampleInputs(ids, tuple({} for _ in range(ids.shape[0])), {}, ("text",))


def build_model(name: str, transformer: dict, model: dict, hf_config=None, **kw):
    """Build the model registered as `name`; `kw` goes to the builder (pre_process, vp_stage, ...)."""
    if name not in BUILDERS:
        raise UsageError(f"no megatron model builder named {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](transformer, model, hf_config=hf_config, **kw)
