"""Manifests: every tensor each side has for one config, read off the real model classes.

HF: the transformers class named by the architecture, instantiated on the meta device (no memory, no init);
its persistent state (parameters and saved buffers). The spec's first HF format is transformers' in-memory
layout; any other format is the layout `save_pretrained` writes, obtained with transformers' own
`revert_weight_conversion`. Megatron: the model chunks built from the plan at one rank (names made global).
"""

from __future__ import annotations

import torch

from ..compiler import ir
from ..errors import UsageError
from .naming import global_names, named_tensors


def hf_model_class(architecture: str):
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise UsageError(f"transformers has no model class '{architecture}'")
    return cls


def hf_manifest(architecture: str, hf_config, fmt: str, formats: tuple[str, ...]) -> ir.Manifest:
    cls = hf_model_class(architecture)
    with torch.device("meta"):
        model = cls(hf_config)
    state = model.state_dict()
    origin = f"transformers {architecture}"
    if fmt != formats[0]:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
        origin += f" (as saved, format '{fmt}')"
    return ir.Manifest(ir.HF, origin, tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                                            for k, v in state.items()))


def mcore_manifest(chunks, model_name: str) -> ir.Manifest:
    tensors = []
    for chunk in chunks:
        names = global_names(chunk)
        for local, tensor in named_tensors(chunk).items():
            tensors.append((names.get(local, local), tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    return ir.Manifest(ir.MCORE, f"the megatron-core '{model_name}' model", tuple(tensors))
