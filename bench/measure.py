"""Measurement workers, each run in a fresh process so that its memory peak is its own: the conversion
(build, import, export, each timed, peak anonymous memory per phase, round trip compared bit for bit), a cProfile
of import and export, and the compile of the full plan."""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

from .geometry import FULL_LAYERS, make_config
from .machine import PeakSampler, drop_caches, statm


def worker_convert(args) -> dict:
    sampler = PeakSampler()
    t0 = time.perf_counter()
    import torch

    from specbridge.api import Converter
    from specbridge.runtime.parallel import init_parallel
    from specbridge.verify import compare_checkpoints

    result = {"imports_s": time.perf_counter() - t0}
    init_parallel()
    start = time.perf_counter()
    conv = Converter.from_pretrained(args.dir)
    result["plan_s"] = time.perf_counter() - start
    result["mappings"] = len(conv.plan.mappings)

    base = sampler.phase()
    start = time.perf_counter()
    chunks = conv.build_model(params_dtype=torch.bfloat16)
    result["build_s"] = time.perf_counter() - start
    params = sum(t.numel() * t.element_size() for c in chunks for t in list(c.parameters()) + list(c.buffers()))
    result["param_bytes"] = params
    result["build_peak_extra"] = sampler.end() - base - params
    # the build skips megatron's random init, so parameter pages are first touched by the import: they are the
    # model's own memory, not memory the import holds, and are subtracted from its peak
    untouched = max(0, params - (statm()[1] - base))
    result["params_first_touched_by_import"] = untouched

    result["import_cold"] = drop_caches() if args.drop_cache else False
    base = sampler.phase()
    start = time.perf_counter()
    reader = conv.import_weights(chunks, args.dir)
    result["import_s"] = time.perf_counter() - start
    result["import_peak_extra"] = sampler.end() - base - untouched
    result["import_bytes_read"] = reader.bytes_read
    reader.close()
    del reader

    os.sync()  # the export starts with no dirty pages, as the write floor does
    out = Path(args.export_dir)
    if out.exists():
        shutil.rmtree(out)
    base = sampler.phase()
    start = time.perf_counter()
    conv.export_weights(chunks, out, dtype=torch.bfloat16)
    result["export_s"] = time.perf_counter() - start
    result["export_peak_extra"] = sampler.end() - base
    result["export_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    sampler.stop()
    result["loadavg"] = os.getloadavg()
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.verify:
        start = time.perf_counter()
        trip = compare_checkpoints(args.dir, out, ignore={s.key for s in conv.plan.sentinels if s.kind == "tied"})
        result["roundtrip"] = trip.summary()
        result["roundtrip_exact"] = trip.exact
        result["verify_s"] = time.perf_counter() - start
    shutil.rmtree(out)
    return result


def worker_profile(args) -> dict:
    """cProfile of import and export (top functions by cumulative time) for the report."""
    import cProfile
    import io
    import pstats

    import torch

    from specbridge.api import Converter
    from specbridge.runtime.parallel import init_parallel

    init_parallel()
    conv = Converter.from_pretrained(args.dir)
    chunks = conv.build_model(params_dtype=torch.bfloat16)
    out = {}
    for phase in ("import", "export"):
        prof = cProfile.Profile()
        prof.enable()
        if phase == "import":
            conv.import_weights(chunks, args.dir)
        else:
            conv.export_weights(chunks, args.export_dir, dtype=torch.bfloat16, overwrite=True)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        out[phase] = text.getvalue()
    shutil.rmtree(args.export_dir, ignore_errors=True)
    return out



def worker_compile(args) -> dict:
    t0 = time.perf_counter()
    from specbridge import compiler
    from specbridge.api import builtin_specs

    imports_s = time.perf_counter() - t0
    cfg = make_config(FULL_LAYERS)
    start = time.perf_counter()
    spec = compiler.load(builtin_specs()["gemma4"])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = compiler.compile_plan(spec, cfg)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    again = compiler.compile_plan(compiler.load(builtin_specs()["gemma4"]), cfg)
    cached_s = time.perf_counter() - start
    assert again is plan
    return {"layers": FULL_LAYERS, "mappings": len(plan.mappings), "sentinels": len(plan.sentinels),
            "imports_s": imports_s, "parse_validate_s": load_s, "compile_s": compile_s,
            "cold_s": load_s + compile_s, "cached_s": cached_s}
