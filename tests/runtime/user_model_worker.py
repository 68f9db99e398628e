"""One rank (plain or under torchrun) of a conversion into a model built with megatron-core's own spec functions.

    user_model_worker.py HF OUT [--te] [--grouped] [--tp N] [--mcore DIR]

Imports HF into the model (`Converter.import_weights`) and exports it back to OUT/hf. Local spec: also the fp32
logits' largest difference from transformers'. `--te`: the TransformerEngine layer spec, on the TE stand-in
(`tests/te_standin.py`: names and shapes only, so no logits); with `--mcore`, also compares the keys and global
shapes the TE model's `sharded_state_dict()` asks for with those in specbridge's checkpoint DIR, loads DIR into a
second TE model with megatron-core's loader and compares its tensors with the imported ones. Writes
OUT/rank{r}.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def manifest(sharded: dict) -> dict[str, list[int]]:
    """What a sharded state dict asks a checkpoint for: each tensor key's global shape, each object's shard id
    (megatron-core's `unique_key`: key/shard_offset_shape)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = {}
    for item in nested_values(sharded):
        items = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        for one in items:
            if isinstance(one, ShardedObject):
                out[one.unique_key] = list(one.global_shape)
            elif isinstance(one, ShardedTensor):
                out[one.key] = list(one.global_shape)
    return out


def written(directory: Path) -> dict[str, list[int]]:
    """The checkpoint's tensors (key -> global shape) and objects (shard ids) from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(directory / "release")).read_metadata()
    return {k: list(v.size) if isinstance(v, TensorStorageMetadata) else [] for k, v in
            metadata.state_dict_metadata.items() if not k.startswith("common_state/")}  # 0.19: the common state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("--te", action="store_true")
    parser.add_argument("--grouped", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--mcore", default=None)
    args = parser.parse_args()
    if args.te:
        from tests import te_standin

        te_standin.install()  # before megatron-core is imported
    import torch

    from specbridge.api import Converter
    from specbridge.runtime.naming import named_tensors
    from specbridge.runtime.parallel import init_parallel
    from specbridge.verify import hf_model, pipeline_logits
    from tests.support import random_ids
    from tests.user_models import user_model

    topology = init_parallel(tp=args.tp)
    out, hf = Path(args.out), args.hf_dir
    conv = Converter.from_pretrained(hf)
    model = user_model(conv, te=args.te, grouped=args.grouped, params_dtype=torch.float32)
    conv.import_weights([model], hf)
    report = {"rank": topology.rank, "modules": sorted({type(m).__name__ for m in model.modules()})}
    if not args.te:
        vocab = conv.plan.model_kwargs()["vocab_size"]
        ids, _ = random_ids(vocab, 10)
        got = pipeline_logits([model], ids, vocab)
        with torch.no_grad():
            expected = hf_model(hf, conv.plan.architecture)(input_ids=ids).logits.float()
        report["max_abs_diff"] = (got - expected).abs().max().item()
        report["same_argmax"] = bool(torch.equal(got.argmax(-1), expected.argmax(-1)))
    conv.export_weights([model], out / "hf")
    if args.mcore:
        from megatron.core import dist_checkpointing

        mcore = Path(args.mcore)
        asked, have = manifest(model.sharded_state_dict()), written(mcore)
        report["missing"] = sorted(k for k in asked if k not in have)
        report["wrong_shape"] = sorted(k for k in asked if k in have and have[k] and have[k] != asked[k])
        report["unasked"] = sorted(k for k in have if k not in asked)
        loaded = user_model(conv, te=args.te, grouped=args.grouped, params_dtype=torch.float32)
        try:
            state = dist_checkpointing.load(loaded.sharded_state_dict(), str(mcore / "release"))
        except Exception as exc:  # reported: the test names what failed
            report["load_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            (out / f"rank{topology.rank}.json").write_text(json.dumps(report))
            return
        result = loaded.load_state_dict(state, strict=False)
        report["load_missing"] = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        mine, theirs = named_tensors(model), named_tensors(loaded)
        report["tensors"] = len(mine)
        report["differ"] = sorted(k for k in mine if not torch.equal(mine[k], theirs[k]))
        report["extra_states_loaded"] = sum(len(getattr(m, "loaded_extra_state", ())) for m in loaded.modules())
    (out / f"rank{topology.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
