"""specbridge side of the side-by-side bench, and the read/write floor (run with specbridge's python).

    sb_worker.py inproc HF_DIR OUT JSON [--tp N]   import into memory (bf16), export HF, stream (phases timed)
    sb_worker.py floor HF_DIR OUT JSON             read every tensor once into fresh memory, write it once

Each phase records wall and CPU seconds, the load average, and the peak resident memory (file-backed pages
included) sampled every 5 ms; under torchrun the phases are separated by barriers and rank 0 reports the
slowest rank.
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident() -> tuple[int, int]:
    """(resident bytes, of which file-backed)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return int(fields[1]) * PAGE, int(fields[2]) * PAGE


class Phases:
    """Times named phases and samples the peak resident memory inside each."""

    def __init__(self, barrier=lambda: None):
        self.barrier, self.res, self._peak, self._stop = barrier, {}, 0, False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            self._peak = max(self._peak, _resident()[0])
            time.sleep(0.005)

    def run(self, name, fn, *args):
        self.barrier()
        self._peak = start_rss = _resident()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.barrier()
        self.res[name] = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                          "load1": os.getloadavg()[0], "rss_start_gb": start_rss / 1e9,
                          "rss_peak_gb": max(self._peak, _resident()[0]) / 1e9}
        return out

    def close(self):
        self._stop = True


def inproc(args):
    import torch
    import torch.distributed as dist

    from specbridge.api import Converter
    from specbridge.runtime.parallel import init_parallel
    from specbridge.runtime.placement import local_tensors

    init_parallel(tp=args.tp)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from workloads import STREAM_AGAIN, import_config_class

    import_config_class(args.hf_dir)  # a library import, before the clock on both sides
    # the package's own modules and megatron-core's GPT model code, loaded before the clock as Megatron-Bridge's
    # package import loads its own (267 modules, its model bridges among them) and megatron-core's GPT model
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401

    import specbridge.compiler  # noqa: F401
    import specbridge.compiler.lower  # noqa: F401
    import specbridge.compiler.validate  # noqa: F401
    import specbridge.dsl.parser  # noqa: F401  (and Lark)

    imports_s = time.time() - T_START
    phases = Phases(dist.barrier if dist.get_world_size() > 1 else lambda: None)
    conv = phases.run("plan", Converter.from_pretrained, args.hf_dir)
    chunks = phases.run("build", conv.build_model, torch.bfloat16)
    reader = phases.run("import", conv.import_weights, chunks, args.hf_dir)
    params = local_tensors(chunks)
    os.sync()
    phases.run("export", conv.export_weights, chunks, args.out)
    os.sync()  # the export's writeback done: the stream touches no disk and is not measured against it

    def stream():
        return sum(t.numel() * t.element_size() for bucket in conv.iter_hf_weights(chunks, args.bucket_bytes)
                   for _, t in bucket)

    # a weight sync runs every training step: the first pass, then the steady state of the passes after it
    stream_bytes = phases.run("stream", stream)
    again = []
    for _ in range(STREAM_AGAIN):
        phases.run("stream_again", stream)
        again.append(phases.res["stream_again"]["s"])
    phases.close()
    sizes = [t.numel() * t.element_size() for t in params.values()]
    report = {"imports_s": imports_s, "phases": phases.res, "bytes_read": reader.bytes_read,
              "param_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "stream_bytes": stream_bytes,
              "stream_again_s": again,
              "param_dtypes": sorted({str(t.dtype) for t in params.values()})}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report) if dist.get_world_size() > 1 else reports.__setitem__(0, report)
    if dist.get_rank() == 0:
        summary = dict(report, ranks=reports, stream_bytes=sum(r["stream_bytes"] for r in reports),
                       versions=versions())
        with open(args.json, "w") as f:
            json.dump(summary, f)


def floor(args):
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.floor import read_fresh
    from bench.floor import write_direct as direct_floor

    files = sorted(f for f in os.listdir(args.hf_dir) if f.endswith(".safetensors"))
    phases = Phases()

    def read_mmap():  # safetensors' own read (mmap), each tensor copied into freshly allocated memory
        shards = []
        for name in files:
            with safe_open(os.path.join(args.hf_dir, name), "pt") as handle:
                shards.append((name, {k: handle.get_tensor(k).clone() for k in handle.keys()}))
        return shards

    def read_pread():  # one read() per tensor straight into a freshly allocated tensor, one thread, kept
        return read_fresh([os.path.join(args.hf_dir, name) for name in files])

    nbytes, kept = phases.run("read_pread", read_pread)
    del kept
    shards = phases.run("read_mmap", read_mmap)
    os.makedirs(args.out, exist_ok=True)
    os.sync()

    def write():
        for name, tensors in shards:
            save_file(tensors, os.path.join(args.out, name), metadata={"format": "pt"})

    def write_direct():
        for name, tensors in shards:
            direct_floor(Path(args.out) / f"direct-{name}", tensors, {"format": "pt"})

    phases.run("write", write)
    phases.run("write_direct", write_direct)
    phases.close()
    with open(args.json, "w") as f:
        json.dump({"phases": phases.res, "bytes": nbytes, "imports_s": None}, f)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "megatron-core", "transformers", "safetensors")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("inproc", "floor"))
    parser.add_argument("hf_dir")
    parser.add_argument("out")
    parser.add_argument("json")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--bucket-bytes", type=int, default=512 << 20)
    args = parser.parse_args()
    {"inproc": inproc, "floor": floor}[args.mode](args)


if __name__ == "__main__":
    main()
