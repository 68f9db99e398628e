"""Checkpoint generation: a bf16 checkpoint of the benchmarked geometry, written tensor by tensor into sharded
safetensors with an index and config.json; reused when it already exists with the same config."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .geometry import check_against_transformers, make_config, numel, tensor_list


def random_bf16(shape, gen, norm: bool = False):
    """Random finite bf16 values without an fp32 detour (randint bits -> bf16): |x| in [5e-4, 8e-3] with random
    sign and mantissa (norm-like tensors: 1 + that). ~3 s/GB on 2 cores, about twice as fast as randn."""
    import torch

    bits = torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=gen)
    bits &= 0x81FF            # sign, 2 low exponent bits, mantissa
    bits |= 116 << 7          # exponent 116..119
    x = bits.view(torch.bfloat16)
    return x + 1 if norm else x


def generate(directory: Path, layers: int, max_shard_bytes: int, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file

    cfg = make_config(layers)
    tensors = tensor_list(cfg)
    n_keys = check_against_transformers(cfg, tensors)
    config_text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    marker = directory / ".bench-complete"
    total = sum(2 * numel(s) for _, s in tensors)
    if marker.exists() and (directory / "config.json").read_text() == config_text:
        return {"layers": layers, "dir": str(directory), "bytes": total, "tensors": n_keys, "reused": True,
                "seconds": 0.0, "shards": len(list(directory.glob("*.safetensors")))}
    start = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    # plan the shards first (HF names need the count), then fill and write one shard at a time
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = 2 * numel(shape)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {key: random_bf16(shape, gen, norm=key.endswith(("norm.weight", "layer_scalar", "scale")))
                for key, shape in shard}
        save_file(data, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key, _ in shard})
        del data
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(config_text)
    os.sync()
    marker.write_text("ok\n")
    return {"layers": layers, "dir": str(directory), "bytes": total, "tensors": n_keys, "reused": False,
            "seconds": round(time.perf_counter() - start, 2), "shards": len(shards)}
