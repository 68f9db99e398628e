"""Megatron-core model builders, by name.

Contract: `BUILDERS` maps a spec's `mcore.model` name to a function
`(transformer: dict, model: dict, *, pre_process, post_process, vp_stage) -> torch.nn.Module`
that builds this rank's model chunk (parallel state must be initialised). It is a plain dict:
other modules register their builders by adding to it.
"""

from __future__ import annotations

from specbridge.errors import UsageError
from specbridge.runtime.models.gemma4 import build_gemma4
from specbridge.runtime.models.gpt import build_gpt

BUILDERS = {"gpt": build_gpt, "gemma4": build_gemma4}


NEEDS_HF_CONFIG = {"gemma4"}  # builders that also take the HF (text) config as `hf_config`


def build_model(name: str, transformer: dict, model: dict, hf_config=None, **kw):
    """Build the model registered as `name`; `kw` goes to the builder (pre_process, vp_stage, ...)."""
    if name not in BUILDERS:
        raise UsageError(f"no megatron model builder named {name!r}; known: {sorted(BUILDERS)}")
    if name in NEEDS_HF_CONFIG:
        kw["hf_config"] = hf_config
    return BUILDERS[name](transformer, model, **kw)
