#!/usr/bin/env python
"""specbridge benchmark: Gemma 4 26B-A4B geometry, N decoder layers, HF <-> Megatron on this machine.

    python bench/run.py                       # layers 1 and 2, results in bench/out/results.{json,md}
    python bench/run.py --layers 2 --out /data/bench --no-drop-cache

Steps (each conversion measurement runs in a fresh subprocess so its memory peak is its own):
  1. generate   a bf16 checkpoint with the real 26B-A4B geometry but N layers (sharded safetensors + index +
                config.json), tensor by tensor, keys/shapes checked against transformers' Gemma4ForCausalLM on
                the meta device; reused when it already exists with the same config.
  2. floor      read every tensor once (safe_open + get_tensor) and write the same bytes once (save_file per
                shard): the I/O floor a converter cannot beat.
  3. convert    Converter.from_pretrained -> build_model (bf16) -> import_weights -> export_weights, each timed;
                peak anonymous memory sampled per phase; round trip compared bit for bit (untimed).
  4. compile    the full 30-layer plan, cold (fresh process) and cached.
  5. two ranks  the same phases under `torchrun --nproc-per-node 2` (`--ep 2`), and the CLI's own
                `torchrun --nproc-per-node 2 -m specbridge roundtrip DIR --ep 2` as a functional check.
Results: <out>/results.json and <out>/results.md (every time also as a ratio to the floor of the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1e9

# google/gemma-4-26B-A4B text config (values of the released config.json); only num_hidden_layers differs
GEMMA4_26B_A4B = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    sliding_window=1024, max_position_embeddings=262144, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, hidden_size_per_layer_input=0,
    num_kv_shared_layers=0, use_bidirectional_attention="vision",
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
FULL_LAYERS = 30


def layer_types(n: int) -> list[str]:
    """26B-A4B pattern (every 6th layer full); for a short model the last layer is full, as transformers
    forces: 1 layer = [full], 2 layers = [sliding, full]."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def make_config(layers: int):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**GEMMA4_26B_A4B, num_hidden_layers=layers, layer_types=layer_types(layers),
                            architectures=["Gemma4ForCausalLM"], dtype="bfloat16")


# ---------------------------------------------------------------- 1. checkpoint generation


def tensor_list(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a Gemma4ForCausalLM checkpoint of `cfg` holds, written from the geometry (not read off the
    model); `check_against_transformers` proves it equal to the real class's state dict."""
    h, heads, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        full = kind == "full_attention"
        g = GEMMA4_26B_A4B  # the full layers' geometry is not an attribute: transformers folds it into per_layer_config
        d = g["global_head_dim"] if full else g["head_dim"]
        kv = g["num_global_key_value_heads"] if full else g["num_key_value_heads"]
        out += [(p + "layer_scalar", (1,)),
                (p + "self_attn.q_proj.weight", (heads * d, h)),
                (p + "self_attn.q_norm.weight", (d,)),
                (p + "self_attn.k_norm.weight", (d,)),
                (p + "self_attn.k_proj.weight", (kv * d, h))]
        if not (full and cfg.attention_k_eq_v):
            out.append((p + "self_attn.v_proj.weight", (kv * d, h)))
        f = cfg.intermediate_size
        out += [(p + "self_attn.o_proj.weight", (h, heads * d)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
        out += [(p + n, (h,)) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                        "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")]
        m = cfg.moe_intermediate_size
        out += [(p + "router.scale", (h,)), (p + "router.per_expert_scale", (e,)), (p + "router.proj.weight", (e, h)),
                (p + "experts.gate_up_proj", (e, 2 * m, h)), (p + "experts.down_proj", (e, h, m))]
        out += [(p + n, (h,)) for n in ("post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_2.weight",
                                        "pre_feedforward_layernorm_2.weight")]
    out.append(("model.norm.weight", (h,)))
    return out


def check_against_transformers(cfg, tensors) -> int:
    """The generated key set and shapes equal Gemma4ForCausalLM's state dict (meta device) minus tied keys."""
    import torch
    from transformers import Gemma4ForCausalLM

    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if cfg.tie_word_embeddings else set()
    expected = {k: s for k, s in state.items() if k not in tied}
    got = dict(tensors)
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise SystemExit(f"generated tensors differ from transformers: missing {missing[:5]}, extra {extra[:5]}, "
                         f"wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}")
    return len(expected)


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
    total = sum(2 * _numel(s) for _, s in tensors)
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
        nbytes = 2 * _numel(shape)
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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- memory sampling (inside workers)


def _statm() -> tuple[int, int]:
    """(resident, anonymous) bytes of this process: anonymous = resident - file-backed/shared pages."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    resident, shared = int(fields[1]) * page, int(fields[2]) * page
    return resident, resident - shared


class PeakSampler:
    """Samples this process's anonymous RSS every `interval` s on a thread; `phase()` restarts the peak."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _statm()[1])
            time.sleep(self.interval)

    def phase(self) -> int:
        """Start a new phase; answers the anonymous RSS now (the phase's baseline)."""
        now = _statm()[1]
        self.peak = now
        return now

    def end(self) -> int:
        self.peak = max(self.peak, _statm()[1])
        return self.peak

    def stop(self):
        self._stop.set()


def drop_caches() -> bool:
    """sync and drop the page cache (needs root); False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- 2. floor (worker)


def worker_floor(args) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(args.dir)
    shards = sorted(src.glob("*.safetensors"))
    cold = drop_caches() if args.drop_cache else False
    # safetensors >= 0.6 answers get_tensor with a tensor backed by the file's mmap (nothing read yet): each
    # tensor is materialised by copying it into one reused, pre-faulted buffer, so the floor counts the reading
    # and one copy, not page faults of fresh memory
    largest = max(_numel(s) * 2 for s in _shapes(shards))
    buffer = torch.ones(largest, dtype=torch.uint8)
    nbytes, start = 0, time.perf_counter()
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in _in_file_order(path):  # f.keys() is sorted by name: reading in offset order is faster
                t = f.get_tensor(key).reshape(-1).view(torch.uint8)
                buffer[:t.numel()].copy_(t)
                nbytes += t.numel()
                del t
    read_s = time.perf_counter() - start
    del buffer
    if args.read_only:
        return {"loadavg": os.getloadavg(), "bytes": nbytes, "read_s": read_s, "read_cold": cold}
    dst = Path(args.scratch)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    # write: the export writes from memory into the page cache with no sync in between, so does the floor
    # (one sync before the phase, none between shards)
    os.sync()
    write_s = 0.0
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            data = {key: f.get_tensor(key).clone() for key in f.keys()}  # in memory, not mmap-backed (untimed)
        start = time.perf_counter()
        save_file(data, str(dst / path.name), metadata={"format": "pt"})
        write_s += time.perf_counter() - start
        del data
    shutil.rmtree(dst)
    return {"loadavg": os.getloadavg(), "bytes": nbytes, "read_s": read_s, "write_s": write_s, "read_cold": cold,
            "read_GBps": nbytes / GB / read_s, "write_GBps": nbytes / GB / write_s}


def _in_file_order(path: Path) -> list[str]:
    """The tensor names of a safetensors file in the order of their data offsets (from the file's header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def _shapes(shards):
    from safetensors import safe_open

    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield f.get_slice(key).get_shape()


# ---------------------------------------------------------------- 3. conversion (worker)


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
    untouched = max(0, params - (_statm()[1] - base))
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
    untouched = max(0, mine_params - (_statm()[1] - build_base))
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


# ---------------------------------------------------------------- 4. compile (worker)


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


# ---------------------------------------------------------------- 5. multi-rank


def multirank_phases(directory: Path, export_dir: Path, nproc: int, tp: int, ep: int, drop_cache: bool,
                     verify: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(Path(__file__).resolve()),
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


# ---------------------------------------------------------------- driver


def run_worker(kind: str, **kw) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", kind]
    for k, v in kw.items():
        if isinstance(v, bool):
            if v:
                cmd.append(f"--{k.replace('_', '-')}")
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _fmt_gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# specbridge benchmark — Gemma 4 26B-A4B geometry",
             "",
             f"Measured {results['when']} on {env['machine']} ({env['cpus']} CPUs, {env['ram_gb']:.0f} GiB RAM, no "
             f"GPU); torch {env['torch']}, megatron-core {env['megatron_core']}, transformers {env['transformers']}, "
             f"safetensors {env['safetensors']}. Page cache: "
             + ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every read measurement: cold reads "
                "as far as this machine goes (a VM's host may still cache its disk); writes go to the page cache "
                "after one `sync`." if results["cold_cache"] else "NOT dropped (warm-cache reads).")
             + f" Load average at start / end: {results['loadavg_start'][0]:.1f} / {results['loadavg_end'][0]:.1f}.",
             "",
             "Floor: read every tensor once (`safe_open` + `get_tensor`, copied into one reused buffer), write the "
             "same bytes once (`save_file` per shard, from memory). The read floor is the smaller of two cold reads, "
             "one before and one after the conversion. Import is compared with the read floor, export with the write "
             "floor; neither side calls fsync. "
             "Peak extra = peak anonymous RSS during the phase minus the RSS before it (for import/export the model's "
             "bf16 parameters are already resident and not counted; for build the parameters are subtracted).",
             "",
             "| layers | checkpoint | read floor | write floor | build | import | import / floor | export | "
             "export / floor | import peak extra | export peak extra | round trip |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        fl, cv = run["floor"], run["convert"]
        lines.append(
            f"| {run['layers']} | {_fmt_gb(fl['bytes'])}, {run['checkpoint']['shards']} shards | "
            f"{fl['read_s']:.2f} s ({fl['read_GBps']:.2f} GB/s) | {fl['write_s']:.2f} s ({fl['write_GBps']:.2f} GB/s) | "
            f"{cv['build_s']:.2f} s | {cv['import_s']:.2f} s | **{run['import_ratio']:.2f}x** | "
            f"{cv['export_s']:.2f} s | **{run['export_ratio']:.2f}x** | {_fmt_gb(cv['import_peak_extra'])} | "
            f"{_fmt_gb(cv['export_peak_extra'])} | {cv.get('roundtrip', 'not verified').split(':')[1].strip() if cv.get('roundtrip') else 'not verified'} |")
    comp = results["compile"]
    lines += ["",
              f"Largest fused tensor of one layer (experts.gate_up_proj): {_fmt_gb(results['largest_fused_bytes'])}; "
              f"largest tensor (embed_tokens): {_fmt_gb(results['largest_tensor_bytes'])}.",
              "",
              f"Compile, full {comp['layers']}-layer plan ({comp['mappings']} mappings, {comp['sentinels']} sentinel): "
              f"cold {comp['cold_s']:.3f} s (fastest of {', '.join(f'{x:.3f}' for x in comp['cold_s_runs'])} s in three "
              f"fresh processes; parse+validate {comp['parse_validate_s']:.3f} s + resolve/invert/order "
              f"{comp['compile_s']:.3f} s, after imports of {comp['imports_s']:.2f} s), cached "
              f"{comp['cached_s'] * 1000:.2f} ms."]
    mr = results.get("multirank")
    if mr is None:
        lines += ["", "Multi-rank: not run (--no-multirank)."]
    else:
        lines += ["", "Two ranks (`torchrun --nproc-per-node 2`, one process per core, gloo; phases separated by "
                  "barriers, time of the slowest rank; peak extra = the larger of the two ranks; ratios to the "
                  "single-process floor of the same checkpoint):", "",
                  "| layers | layout | build | import | import / floor | export | export / floor | bytes read (all ranks) "
                  "| import peak extra | export peak extra (rank 0 / rank 1) | round trip |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mr:
            layout = f"tp={r.get('tp', '?')} ep={r.get('ep', '?')}"
            if not r["ok"]:
                lines.append(f"| {r['layers']} | {r['command']} | failed: {' / '.join(r.get('output') or [r.get('error', '')])} |"
                             " | | | | | | | |")
                continue
            peaks = " / ".join(_fmt_gb(x["export_peak_extra"]) for x in r["ranks"])
            trip = r["roundtrip"].split(":")[1].strip() if r.get("roundtrip") else "not verified"
            lines.append(f"| {r['layers']} | {layout} | {r['build_s']:.2f} s | {r['import_s']:.2f} s | "
                         f"**{r['import_ratio']:.2f}x** | {r['export_s']:.2f} s | **{r['export_ratio']:.2f}x** | "
                         f"{_fmt_gb(r['import_bytes_read'])} | {_fmt_gb(r['import_peak_extra'])} | {peaks} | {trip} |")
        cli = results.get("multirank_cli")
        if cli is not None:
            lines.append("")
            if cli["ok"]:
                lines.append(f"CLI check `{cli['command']}` ({cli['layers']} layer): ok, {cli['roundtrip_s']:.1f} s "
                             "for the whole command.")
            else:
                lines.append(f"CLI check `{cli['command']}` ({cli['layers']} layer): FAILED "
                             f"({cli.get('error') or 'rc ' + str(cli.get('rc'))}): {' / '.join(cli.get('output', []))}")
    lines.append("")
    lines.append("Targets: import <= 1.3x floor, export <= 1.5x floor, peak extra <= one layer's largest fused "
                 "tensor and flat in the number of layers, compile < 1 s cold.")
    lines += ["", "Verdicts (this run):", ""]
    fused = results["largest_fused_bytes"]
    for run in results["runs"]:
        cv = run["convert"]
        lines.append(f"- {run['layers']} layer(s): import {_verdict(run['import_ratio'] <= 1.3)}, export "
                     f"{_verdict(run['export_ratio'] <= 1.5)}, import memory "
                     f"{_verdict(cv['import_peak_extra'] <= fused)}, export memory "
                     f"{_verdict(cv['export_peak_extra'] <= fused)}")
    peaks = [max(r["convert"]["import_peak_extra"], r["convert"]["export_peak_extra"]) for r in results["runs"]]
    if len(peaks) > 1:
        lines.append(f"- peak extra memory flat in layers ({', '.join(_fmt_gb(p) for p in peaks)}): "
                     f"{_verdict(max(peaks) <= 1.1 * min(peaks) + 0.05 * GB)}")
    lines.append(f"- compile cold {results['compile']['cold_s']:.3f} s: {_verdict(results['compile']['cold_s'] < 1)}")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024 / 2**30
    return {"machine": platform.machine() + " " + platform.processor(), "cpus": os.cpu_count(), "ram_gb": ram,
            "python": platform.python_version(), "torch": version("torch"), "megatron_core": version("megatron-core"),
            "transformers": version("transformers"), "safetensors": version("safetensors")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out"), help="checkpoints and results (default bench/out)")
    parser.add_argument("--layers", default="1,2", help="decoder layer counts to measure (default 1,2)")
    parser.add_argument("--max-shard-bytes", type=float, default=1.5e9, help="generated shard size (default 1.5e9)")
    parser.add_argument("--no-drop-cache", dest="drop_cache", action="store_false",
                        help="do not drop the page cache before reads/writes (warm-cache figures)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bit-exact comparison")
    parser.add_argument("--no-multirank", dest="multirank", action="store_false")
    parser.add_argument("--multirank-layouts", default="ep=2",
                        help="2-rank layouts for the phase-by-phase run on the largest checkpoint "
                             "(default 'ep=2'; e.g. 'ep=2;tp=2')")
    parser.add_argument("--cli-flags", default="--ep 2",
                        help="flags of the CLI check `torchrun ... -m specbridge roundtrip` (smallest checkpoint)")
    parser.add_argument("--profile", action="store_true", help="also cProfile import/export (largest layer count)")
    parser.add_argument("--mb-venv", default=None,
                        help="a Megatron-Bridge venv (bench/sidebyside): measure it side by side on the workloads")
    parser.add_argument("--workloads", default="w1_llama,w2_qwen3moe,w3_gemma4", help="side-by-side workloads")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (interleaved)")
    parser.add_argument("--sidebyside-tp", default="1,2", help="side-by-side TP sizes")
    parser.add_argument("--e2e-tp", default="1,2", help="side by side: TP sizes also run end to end ('' for none)")
    parser.add_argument("--e2e-rounds", type=int, default=None, help="side by side: end to end in the first N rounds")
    parser.add_argument("--no-sidebyside", dest="sidebyside", action="store_false")
    parser.add_argument("--sidebyside-only", action="store_true", help="skip the Gemma 4 26B-A4B slice")
    parser.add_argument("--results", default=str(HERE / "results"), help="latest.json / latest.md (committed)")
    args = parser.parse_args(argv)
    if args.sidebyside_only:
        return record(args, None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cold = drop_caches() if args.drop_cache else False
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(), "cold_cache": cold,
               "loadavg_start": os.getloadavg(), "runs": []}
    start_all = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    for n in layers:
        directory = out / f"gemma4-26b-a4b-{n}layer"
        ckpt = generate(directory, n, int(args.max_shard_bytes))
        how = "reused" if ckpt["reused"] else f"generated in {ckpt['seconds']} s"
        print(f"[{n} layer] checkpoint {directory} {_fmt_gb(ckpt['bytes'])} ({how})", flush=True)
        floor = run_worker("floor", dir=directory, scratch=out / f"floor-{n}", drop_cache=cold)
        print(f"[{n} layer] floor read {floor['read_s']:.2f} s write {floor['write_s']:.2f} s", flush=True)
        conv = run_worker("convert", dir=directory, export_dir=out / f"export-{n}", drop_cache=cold,
                          verify=args.verify)
        # the read floor again, after the conversion: the device (a VM disk, possibly cached by its host) can be
        # faster the second time; the smaller of the two is the floor, so the order cannot favour the import
        again = run_worker("floor", dir=directory, drop_cache=cold, read_only=True)
        floor["read_s_runs"] = [floor["read_s"], again["read_s"]]
        floor["read_s"] = min(floor["read_s_runs"])
        floor["read_GBps"] = floor["bytes"] / GB / floor["read_s"]
        run = {"layers": n, "checkpoint": ckpt, "floor": floor, "convert": conv,
               "import_ratio": conv["import_s"] / floor["read_s"], "export_ratio": conv["export_s"] / floor["write_s"]}
        print(f"[{n} layer] build {conv['build_s']:.2f} s import {conv['import_s']:.2f} s "
              f"({run['import_ratio']:.2f}x) export {conv['export_s']:.2f} s ({run['export_ratio']:.2f}x) "
              f"peak extra import {_fmt_gb(conv['import_peak_extra'])} export {_fmt_gb(conv['export_peak_extra'])} "
              f"{conv.get('roundtrip', '')}", flush=True)
        results["runs"].append(run)
    cfg = make_config(max(layers))
    sizes = {k: 2 * _numel(s) for k, s in tensor_list(cfg)}
    results["largest_fused_bytes"] = max(v for k, v in sizes.items() if k.endswith("gate_up_proj"))
    results["largest_tensor_bytes"] = max(sizes.values())
    compiles = [run_worker("compile") for _ in range(3)]  # fresh processes; the fastest, all three kept
    results["compile"] = dict(min(compiles, key=lambda c: c["cold_s"]), cold_s_runs=[c["cold_s"] for c in compiles])
    print(f"compile cold {results['compile']['cold_s']:.3f} s cached {results['compile']['cached_s'] * 1000:.2f} ms",
          flush=True)
    if args.profile:
        n = max(layers)
        results["profile"] = run_worker("profile", dir=out / f"gemma4-26b-a4b-{n}layer", export_dir=out / "profile")
    if args.multirank:
        results["multirank"] = []
        n = max(layers)
        floor = next(r["floor"] for r in results["runs"] if r["layers"] == n)
        for layout in args.multirank_layouts.split(";"):
            sizes = dict(item.split("=") for item in layout.split(","))
            tp, ep = int(sizes.get("tp", 1)), int(sizes.get("ep", 1))
            r = multirank_phases(out / f"gemma4-26b-a4b-{n}layer", out / f"export-mr-{n}", 2, tp, ep, cold,
                                 args.verify, timeout=400)
            r["layers"] = n
            if r["ok"]:
                r["import_ratio"], r["export_ratio"] = r["import_s"] / floor["read_s"], r["export_s"] / floor["write_s"]
                print(f"[{n} layer, 2 ranks tp={tp} ep={ep}] build {r['build_s']:.2f} s import {r['import_s']:.2f} s "
                      f"export {r['export_s']:.2f} s {r.get('roundtrip', '')}", flush=True)
            else:
                print(f"[{n} layer, 2 ranks tp={tp} ep={ep}] FAILED: {r.get('output') or r.get('error')}", flush=True)
            results["multirank"].append(r)
        # the CLI's own multi-rank round trip, as a functional check (smallest checkpoint)
        n = min(layers)
        r = multirank(out / f"gemma4-26b-a4b-{n}layer", 2, args.cli_flags.split(), timeout=400)
        r["layers"] = n
        print(f"multi-rank CLI {r['command']}: {'ok' if r['ok'] else 'FAILED'} {r.get('roundtrip_s', 0):.1f} s "
              f"{'' if r['ok'] else r.get('output')}", flush=True)
        results["multirank_cli"] = r
    results["total_s"] = time.perf_counter() - start_all
    results["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"total {results['total_s']:.0f} s; results in {out / 'results.json'} and {out / 'results.md'}")
    return record(args, results)


def record(args, gemma_slice: dict | None) -> int:
    """The side-by-side part (bench/sidebyside), then the record: <results>/latest.json and latest.md (rewritten
    after every side-by-side unit, so an interrupted run still leaves its figures)."""
    sys.path.insert(0, str(HERE / "sidebyside"))
    import orchestrate

    latest = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment()}
    if gemma_slice is not None:
        latest["gemma4_26b_a4b_slice"] = gemma_slice
    if args.sidebyside:
        mb_python = str(Path(args.mb_venv) / "bin" / "python") if args.mb_venv else None
        if mb_python:
            latest["environment"]["megatron-bridge venv"] = subprocess.run(
                [mb_python, "-c", "import importlib.metadata as m; print(', '.join(n + ' ' + m.version(n) for n in "
                 "('megatron-bridge', 'megatron-core', 'transformers', 'torch')))"],
                capture_output=True, text=True).stdout.strip()

        def write_partial(partial):
            write_record(args, dict(latest, sidebyside=partial))

        latest["sidebyside"] = orchestrate.run(Path(args.out) / "sidebyside", mb_python, args.workloads.split(","),
                                               args.rounds, [int(t) for t in args.sidebyside_tp.split(",")],
                                               [int(t) for t in args.e2e_tp.split(",") if t], args.e2e_rounds,
                                               on_unit=write_partial)
    print(write_record(args, latest))
    return 0


def write_record(args, latest: dict) -> str:
    import orchestrate

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = [f"# Latest bench run ({latest['when']})", "", f"Machine and versions: `{json.dumps(latest['environment'])}`",
            ""]
    if "sidebyside" in latest:
        text.append(orchestrate.markdown(latest["sidebyside"]))
    if "gemma4_26b_a4b_slice" in latest:
        text += ["## Gemma 4 26B-A4B geometry, N layers", "", markdown(latest["gemma4_26b_a4b_slice"])]
    (results / "latest.json").write_text(json.dumps(latest, indent=1, default=str) + "\n")
    (results / "latest.md").write_text("\n".join(text) + "\n")
    return "\n".join(text) + f"\nrecord: {results / 'latest.json'}, {results / 'latest.md'}"


def worker_main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("floor", "convert", "compile", "profile", "multirank"))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--dir")
    parser.add_argument("--scratch")
    parser.add_argument("--export-dir")
    parser.add_argument("--drop-cache", action="store_true")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--read-only", action="store_true")
    args = parser.parse_args(argv)
    result = {"floor": worker_floor, "convert": worker_convert, "compile": worker_compile,
              "profile": worker_profile, "multirank": worker_multirank}[args.kind](args)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
