"""One rank of the streaming weight-sync test, launched by torchrun: import HF_DIR at the given layout, write
what `iter_hf_weights(bucket_bytes=BOUND)` yields on this rank (OUT/rank{r}.pt, bucket names in
OUT/rank{r}.json), then export to OUT/hf for comparison."""

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("bound", type=int)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    args = parser.parse_args()

    from specbridge.api import Converter
    from specbridge.runtime.parallel import current_topology, init_parallel

    init_parallel(tp=args.tp, ep=args.ep)
    rank = current_topology().rank
    conv = Converter.from_pretrained(args.hf_dir)
    chunks = conv.build_model()
    conv.import_weights(chunks, args.hf_dir)
    tensors, names = {}, []
    for bucket in conv.iter_hf_weights(chunks, bucket_bytes=args.bound):
        names.append([name for name, _ in bucket])
        tensors.update({name: t.clone() for name, t in bucket})
    out = Path(args.out)
    torch.save(tensors, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"buckets": names}))
    conv.export_weights(chunks, out / "hf")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
