"""Two ranks: the conversion phases under torchrun (the worker and its launcher), and the CLI's own multi-rank
round trip as a functional check."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .machine import PeakSampler, drop_caches, statm

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(__file__).resolve().parent / "run.py"


def worker_multirank(args) -> dict:
    """Under torchrun: build, import, export on every rank (phases separated by barriers, timed on rank 0),
    peak anonymous memory per rank; rank 0 compares the export with the source (untimed)."""
    sampler = PeakSampler()
    import torch
    import torch.distributed as dist

    from specbridge.api import Converter
    from specbridge.runtime.parallel import init_parallel
    from specbridge.verify import compare_checkpoints

    topo = init_parallel(tp=args.tp, ep=args.ep)
    conv = Converter.from_pretrained(args.dir)
    mine = {"rank": topo.rank}
    build_base = sampler.phase()
    start = time.perf_counter()
    chunks = conv.build_model(params_dtype=torch.bfloat16)
    dist.barrier()
    mine["build_s"] = time.perf_counter() - start
    mine_params = sum(t.numel() * t.element_size() for c in chunks for t in list(c.parameters()) + list(c.buffers()))
    mine["param_bytes"] = mine_params
    if args.drop_cache and topo.rank == 0:
        drop_caches()
    dist.barrier()
    base = sampler.phase()
    untouched = max(0, mine_params - (statm()[1] - build_base))
    start = time.perf_counter()
    reader = conv.import_weights(chunks, args.dir)
    mine["import_own_s"] = time.perf_counter() - start
    dist.barrier()
    mine["import_s"] = time.perf_counter() - start
    mine["import_peak_extra"] = sampler.end() - base - untouched
    mine["import_bytes_read"] = reader.bytes_read
    reader.close()
    os.sync()
    dist.barrier()
    base = sampler.phase()
    start = time.perf_counter()
    conv.export_weights(chunks, args.export_dir, dtype=torch.bfloat16, overwrite=True)
    mine["export_own_s"] = time.perf_counter() - start
    dist.barrier()
    mine["export_s"] = time.perf_counter() - start
    mine["export_peak_extra"] = sampler.end() - base
    sampler.stop()
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    result = {"world_size": dist.get_world_size(), "tp": args.tp, "ep": args.ep, "ranks": ranks,
              "build_s": max(r["build_s"] for r in ranks), "import_s": max(r["import_s"] for r in ranks),
              "export_s": max(r["export_s"] for r in ranks),
              "import_peak_extra": max(r["import_peak_extra"] for r in ranks),
              "export_peak_extra": max(r["export_peak_extra"] for r in ranks),
              "import_bytes_read": sum(r["import_bytes_read"] for r in ranks)}
    if topo.rank == 0:
        if args.verify:
            trip = compare_checkpoints(args.dir, args.export_dir,
                                       ignore={s.key for s in conv.plan.sentinels if s.kind == "tied"})
            result["roundtrip"], result["roundtrip_exact"] = trip.summary(), trip.exact
        shutil.rmtree(args.export_dir, ignore_errors=True)
        print(json.dumps(result), flush=True)
    dist.barrier()
    sys.exit(0)



def multirank_phases(directory: Path, export_dir: Path, nproc: int, tp: int, ep: int, drop_cache: bool,
                     verify: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(RUN),
           "_worker", "multirank", "--dir", str(directory), "--export-dir", str(export_dir), "--tp", str(tp),
           "--ep", str(ep)] + (["--drop-cache"] if drop_cache else []) + (["--verify"] if verify else [])
    label = f"torchrun --nproc-per-node {nproc} bench/run.py _worker multirank --tp {tp} --ep {ep}"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": label, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not found:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [ln.strip() for ln in lines if "error" in ln.lower() and "elastic/errors" not in ln
                  and "error_file" not in ln][-4:]
        return {"command": label, "ok": False, "rc": proc.returncode, "output": errors or lines[-6:]}
    return {"command": label, "ok": True, **json.loads(found[-1])}


def multirank(directory: Path, nproc: int, flags: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "specbridge",
           "roundtrip", str(directory), *flags]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[2:]), "ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower() and "elastic/errors" not in ln
              and "error_file" not in ln][-4:]
    tail = errors or lines[-6:]
    return {"command": "torchrun " + " ".join(cmd[3:]), "ok": proc.returncode == 0, "rc": proc.returncode,
            "roundtrip_s": wall, "output": tail, "children_maxrss": usage.ru_maxrss * 1024}
