"""One rank of a multi-rank test, launched by torchrun: import an HF checkpoint at the given TP/PP/EP/VPP,
export it (distributed), save a Megatron dist checkpoint, compute logits through the pipeline schedule, and
write this rank's findings to OUT/rank{r}.json (logits to OUT/logits.pt on the last stage's TP rank 0)."""

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    for flag in ("tp", "pp", "ep"):
        parser.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=12)
    args = parser.parse_args()

    from specbridge.api import Converter
    from specbridge.runtime import direct_write, exporter, mcore_checkpoint
    from specbridge.runtime.models import sample_inputs
    from specbridge.runtime.parallel import init_parallel
    from specbridge.runtime.placement import local_tensors
    from specbridge.verify import pipeline_logits
    from tests.support import random_ids

    direct_write.DIRECT_BYTES = 8192  # tiny tensors: their blocks written in place go out direct too
    topology = init_parallel(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
    conv = Converter.from_pretrained(args.hf_dir)
    overrides = {"num_layers_in_first_pipeline_stage": args.first_stage_layers} if args.first_stage_layers else {}
    chunks = conv.build_model(extra_transformer=overrides)
    reader = conv.import_weights(chunks, args.hf_dir)
    out = Path(args.out)
    local = local_tensors(chunks)
    owned = sum(t.numel() * 4 for name, t in local.items())
    vocab = conv.plan.model_kwargs()["vocab_size"]
    inputs = sample_inputs(conv.plan.model, conv.hf_config, *random_ids(vocab, args.seq_len))
    logits = pipeline_logits(chunks, inputs.ids, vocab, inputs.rows)
    if logits is not None and topology.tp_rank == 0:
        torch.save(logits, out / "logits.pt")
    conv.export_weights(chunks, out / "hf", max_shard_bytes=64 << 10)  # several shard files written in place
    mcore_checkpoint.save(chunks, out / "mcore", {"spec": str(conv.spec_path), "architecture": conv.plan.architecture,
                                                   "format": conv.plan.format, "hf_config": conv.hf_config.to_dict(),
                                                   "padded_vocab_size": chunks[0].vocab_size})
    report = {"rank": topology.rank, "bytes_read": reader.bytes_read, "local_bytes": owned,
              "local_layers": sorted({int(n.split(".")[2]) for n in local if n.startswith("decoder.layers.")}),
              "local_experts": sorted({int(n.split(".")[6]) for n in local if ".local_experts." in n}),
              "gathered_bytes": exporter.stats.gathered_bytes, "placed_bytes": exporter.stats.placed_bytes,
              "placed_direct_bytes": exporter.stats.placed_direct_bytes}
    (out / f"rank{topology.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.dump_traceback_later(int(os.environ.get("SPECBRIDGE_WORKER_TIMEOUT", "1100")), exit=True)
    main()
