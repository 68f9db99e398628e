"""One rank of a multi-rank LoRA test, launched by torchrun: import an HF checkpoint and a PEFT adapter at the given
TP/EP, compute logits through the pipeline schedule (OUT/logits.pt), export the adapter (OUT/peft) and the merged
model (OUT/merged), and save the Megatron checkpoint with its adapter (OUT/mcore)."""

import argparse
import faulthandler
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("peft_dir")
    parser.add_argument("out")
    for flag in ("tp", "pp", "ep"):
        parser.add_argument(f"--{flag}", type=int, default=1)
    args = parser.parse_args()

    from megatron.core import parallel_state as ps

    from specbridge.api import Converter
    from specbridge.runtime import mcore_checkpoint
    from specbridge.runtime.parallel import init_parallel
    from specbridge.verify import pipeline_logits

    init_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    conv = Converter.from_pretrained(args.hf_dir)
    chunks = conv.build_model()
    conv.import_weights(chunks, args.hf_dir)
    settings = conv.import_adapter(chunks, args.peft_dir)
    out = Path(args.out)
    vocab = conv.plan.model_kwargs()["vocab_size"]
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = pipeline_logits(chunks, ids, vocab)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, out / "logits.pt")
    conv.export_adapter(chunks, out / "peft", settings)
    conv.export_merged(chunks, out / "merged", settings)
    metadata = {"spec": str(conv.spec_path), "architecture": conv.plan.architecture, "format": conv.plan.format,
                "hf_config": conv.hf_config.to_dict(), "adapter": settings.to_json()}
    mcore_checkpoint.save(chunks, out / "mcore", metadata)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.dump_traceback_later(int(os.environ.get("SPECBRIDGE_WORKER_TIMEOUT", "240")), exit=True)
    main()
