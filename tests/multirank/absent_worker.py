"""One rank of the absent-part fault test, launched by torchrun: import a Gemma 4 checkpoint (K = V on its full
layers), make V diverge from K in layer 2 on every rank, export, and write the error this rank raised (or None) to
OUT/rank{r}.json."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    hf_dir, out = sys.argv[1], Path(sys.argv[2])
    from specbridge.api import Converter
    from specbridge.errors import ConversionError
    from specbridge.runtime.parallel import init_parallel

    topology = init_parallel()
    conv = Converter.from_pretrained(hf_dir)
    chunks = conv.build_model()
    conv.import_weights(chunks, hf_dir)
    qkv = dict(chunks[0].named_parameters())["decoder.layers.2.self_attention.linear_qkv.weight"]
    with torch.no_grad():
        qkv.view(1, 4 * 32 + 32 + 32, 64)[0, 170, 3] += 0.25  # a V row of the one KV group
    try:
        conv.export_weights(chunks, out / "hf")
        error = None
    except ConversionError as exc:
        error = str(exc)
    (out / f"rank{topology.rank}.json").write_text(json.dumps({"error": error}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.dump_traceback_later(int(os.environ.get("SPECBRIDGE_WORKER_TIMEOUT", "500")), exit=True)
    main()
