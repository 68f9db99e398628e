"""Side by side with Megatron-Bridge on the three workloads, interleaved, with the read/write floor.

Per round, for each workload and TP size, in an order that alternates which tool goes first: specbridge in
process (import into bf16 memory, export HF, stream), Megatron-Bridge in process (`load_hf_weights` through its
provider, `save_hf_pretrained`, `export_hf_weights`), the floor (TP1), then end to end what users run: `specbridge
import HF DIR` against MB's `import_ckpt` body, `specbridge export DIR HF` against `export_ckpt` (whole processes,
start-up included). Every export is compared with the source bit for bit (untimed). Ratios are paired per round
(same round, same load) and reported as median with min-max; the load average is recorded for every run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from workloads import STREAM_AGAIN, WORKLOADS  # noqa: E402


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def timed(cmd: list[str], timeout: float) -> dict:
    """Run a command; wall seconds, peak RSS of the process tree (GB), load average before, rc, output tail."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "rc": proc.returncode, "load1": load, "tail": "" if proc.returncode == 0 else output[-3000:]}


def _python_run(python: str, tp: int, script: list[str]) -> list[str]:
    if tp == 1:
        return [python, *script]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), *script]


def ensure_workload(name: str, root: Path, maker: str) -> Path:
    directory = root / name
    if not (directory / "config.json").exists():
        shutil.rmtree(directory, ignore_errors=True)
        subprocess.run([maker, str(HERE / "workloads.py"), name, str(directory)], check=True, env=_env())
    for f in directory.glob("*.safetensors"):  # warm the page cache: every run reads from memory
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass
    return directory


def evict(directory: Path) -> None:
    """Drop the page-cache pages of every file under `directory` (clean ones: call after a sync). The export then
    reads the Megatron checkpoint from the device whichever way its tool wrote it (specbridge direct, past the page
    cache; Megatron-Bridge through it), as it would a checkpoint that training wrote long before."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def exact(source: Path, exported: Path) -> bool | None:
    from specbridge.verify import compare_checkpoints

    if not exported.exists():
        return None
    return compare_checkpoints(source, exported).exact


def one_round(name: str, hf_dir: Path, tp: int, mb_python: str | None, scratch: Path, e2e: bool, first_mb: bool,
              timeout: float) -> dict:
    sb, out = sys.executable, {}
    tag = f"{name}_tp{tp}"

    def inproc(tool):
        o, j = scratch / f"{tag}_{tool}_hf", scratch / f"{tag}_{tool}.json"
        shutil.rmtree(o, ignore_errors=True)
        j.unlink(missing_ok=True)
        os.sync()  # the previous run's writes (the other tool's export) are on disk before this one starts
        if tool == "sb":
            script = [str(HERE / "sb_worker.py"), "inproc", str(hf_dir), str(o), str(j), "--tp", str(tp)]
            run = timed(_python_run(sb, tp, script), timeout)
        else:
            script = [str(HERE / "mb_worker.py"), "inproc", str(hf_dir), str(o), str(j), "--tp", str(tp)]
            run = timed(_python_run(mb_python, tp, script), timeout)
        if j.exists():
            run["report"] = json.loads(j.read_text())
        run["exact"] = exact(hf_dir, o)
        shutil.rmtree(o, ignore_errors=True)
        out[f"{tool}_inproc"] = run

    def e2e_pair(tool):
        mcore, hf = scratch / f"{tag}_{tool}_mcore", scratch / f"{tag}_{tool}_e2e_hf"
        for d in (mcore, hf):
            shutil.rmtree(d, ignore_errors=True)
        flags = ["--tp", str(tp)]
        if tool == "sb":
            imp = _python_run(sb, tp, ["-m", "specbridge", "import", str(hf_dir), str(mcore), *flags])
            exp = _python_run(sb, tp, ["-m", "specbridge", "export", str(mcore), str(hf), *flags])
        else:
            imp = _python_run(mb_python, tp, [str(HERE / "mb_worker.py"), "import", str(hf_dir), str(mcore), *flags])
            exp = _python_run(mb_python, tp, [str(HERE / "mb_worker.py"), "export", str(hf_dir), str(mcore), str(hf),
                                              *flags])
        os.sync()
        out[f"{tool}_e2e_import"] = timed(imp, timeout)
        out[f"{tool}_e2e_import"]["mcore_bytes"] = sum(f.stat().st_size for f in mcore.rglob("*") if f.is_file())
        os.sync()
        evict(mcore)
        out[f"{tool}_e2e_export"] = timed(exp, timeout)
        out[f"{tool}_e2e_export"]["exact"] = exact(hf_dir, hf)
        for d in (mcore, hf):
            shutil.rmtree(d, ignore_errors=True)

    tools = ["sb"] + (["mb"] if mb_python else [])
    if first_mb:
        tools.reverse()
    for tool in tools:
        inproc(tool)
    if tp == 1:
        o, j = scratch / f"{tag}_floor", scratch / f"{tag}_floor.json"
        shutil.rmtree(o, ignore_errors=True)
        os.sync()
        run = timed([sb, str(HERE / "sb_worker.py"), "floor", str(hf_dir), str(o), str(j)], timeout)
        run["report"] = json.loads(j.read_text()) if j.exists() else None
        shutil.rmtree(o, ignore_errors=True)
        out["floor"] = run
    if e2e:
        for tool in tools:
            e2e_pair(tool)
    return out


def help_times(n: int = 3) -> list[float]:
    return [timed([sys.executable, "-m", "specbridge", "--help"], 60)["wall_s"] for _ in range(n)]


def run(out: Path, mb_python: str | None, workloads=WORKLOADS, rounds: int = 3, tps=(1, 2), e2e_tps=(1, 2),
        e2e_rounds: int | None = None, timeout: float = 900, on_unit=None) -> dict:
    """Every round runs in process at every TP size; end to end at `e2e_tps` in the first `e2e_rounds` rounds.
    `on_unit(partial result)` is called after each (round, workload, TP) unit, so a long run leaves a record."""
    ckpt_root, scratch = out / "workloads", out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    maker = mb_python or sys.executable
    dirs = {name: ensure_workload(name, ckpt_root, maker) for name in workloads}
    result = {"rounds": [], "mb_python": mb_python, "loadavg_start": os.getloadavg(),
              "checkpoint_bytes": {n: sum(f.stat().st_size for f in d.glob("*.safetensors")) for n, d in dirs.items()},
              "help_s": help_times()}
    for r in range(rounds):
        for name in workloads:
            for tp in tps:
                print(f"[side by side] round {r + 1}/{rounds} {name} tp{tp} load {os.getloadavg()[0]:.1f}", flush=True)
                e2e = tp in e2e_tps and (e2e_rounds is None or r < e2e_rounds)
                runs = one_round(name, dirs[name], tp, mb_python, scratch, e2e, first_mb=bool(r % 2),
                                 timeout=timeout)
                result["rounds"].append({"round": r, "workload": name, "tp": tp, "runs": runs})
                if on_unit is not None:
                    on_unit(dict(result, loadavg_end=os.getloadavg(), summary=summarize(result),
                                 partial=f"{len(result['rounds'])} of {rounds * len(workloads) * len(tps)} units"))
    result["loadavg_end"] = os.getloadavg()
    result["help_s"] += help_times()
    result["summary"] = summarize(result)
    return result


# ---------------------------------------------------------------- summary


def _phase(run: dict | None, name: str) -> float | None:
    try:
        return run["report"]["phases"][name]["s"]
    except (KeyError, TypeError):
        return None


def _steady(run: dict | None) -> float | None:
    """The median time of a run's stream passes after the first (the steady state of a per-step weight sync)."""
    passes = ((run or {}).get("report") or {}).get("stream_again_s")
    return statistics.median(passes) if passes else None


def _spread(xs) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(result: dict) -> dict:
    summary = {}
    for entry in result["rounds"]:
        key = f"{entry['workload']} tp{entry['tp']}"
        s = summary.setdefault(key, {k: [] for k in (
            "sb_import", "mb_import", "sb_export", "mb_export", "sb_stream_GBps", "mb_stream_GBps",
            "sb_stream_steady_GBps", "mb_stream_steady_GBps", "stream_steady_vs_mb",
            "import_vs_mb", "export_vs_mb", "stream_vs_mb", "floor_read", "floor_write", "import_vs_floor",
            "export_vs_floor", "sb_whole_import_vs_floor", "mb_import_vs_floor", "mb_export_vs_floor",
            "sb_e2e_import", "mb_e2e_import", "sb_e2e_export", "mb_e2e_export",
            "e2e_import_vs_mb", "e2e_export_vs_mb", "sb_peak_rss_gb", "rss_bound_gb", "load1", "exact",
            "sb_mcore_gb", "mb_mcore_gb")})
        runs = entry["runs"]
        sbr, mbr = runs.get("sb_inproc"), runs.get("mb_inproc")
        # import = plan + build + import, as MB's `import_s` is from_hf_pretrained + provider + model + load
        parts = [_phase(sbr, p) for p in ("plan", "build", "import")]
        si = sum(parts) if None not in parts else None
        se, ss = _phase(sbr, "export"), _phase(sbr, "stream")
        mi = (mbr or {}).get("report", {}).get("import_s")
        me = (mbr or {}).get("report", {}).get("export_s")
        ms = (mbr or {}).get("report", {}).get("stream_s")
        s["sb_import"].append(si), s["sb_export"].append(se), s["mb_import"].append(mi), s["mb_export"].append(me)
        if ss and sbr.get("report"):
            s["sb_stream_GBps"].append(sbr["report"]["stream_bytes"] / 1e9 / ss)
        if ms:
            s["mb_stream_GBps"].append(mbr["report"]["stream_bytes"] / 1e9 / ms)
        s["import_vs_mb"].append(mi / si if mi and si else None)
        s["export_vs_mb"].append(me / se if me and se else None)
        s["stream_vs_mb"].append(ms / ss if ms and ss else None)
        ssa, msa = _steady(sbr), _steady(mbr)
        if ssa:
            s["sb_stream_steady_GBps"].append(sbr["report"]["stream_bytes"] / 1e9 / ssa)
        if msa:
            s["mb_stream_steady_GBps"].append(mbr["report"]["stream_bytes"] / 1e9 / msa)
        s["stream_steady_vs_mb"].append(msa / ssa if msa and ssa else None)
        floor = runs.get("floor")
        fr = min(filter(None, (_phase(floor, "read_pread"), _phase(floor, "read_mmap"))), default=None)
        fw = min(filter(None, (_phase(floor, "write"), _phase(floor, "write_direct"))), default=None)
        s["floor_read"].append(fr), s["floor_write"].append(fw)
        weights = _phase(sbr, "import")  # the floor is the reading alone
        s["import_vs_floor"].append(weights / fr if weights and fr else None)
        s["export_vs_floor"].append(se / fw if se and fw else None)
        # both tools' whole import (plan and model build included) and export against the same floor
        s["sb_whole_import_vs_floor"].append(si / fr if si and fr else None)
        s["mb_import_vs_floor"].append(mi / fr if mi and fr else None)
        s["mb_export_vs_floor"].append(me / fw if me and fw else None)
        if sbr and sbr.get("report"):
            rep = sbr["report"]
            # resident memory the import adds (file-backed pages included) against parameters + largest tensor
            s["sb_peak_rss_gb"].append(max(r["phases"]["import"]["rss_peak_gb"] - r["phases"]["import"]["rss_start_gb"]
                                           for r in rep["ranks"]))
            s["rss_bound_gb"].append(max(r["param_bytes"] + r["largest_tensor_bytes"] for r in rep["ranks"]) / 1e9)
        for tool in ("sb", "mb"):
            for what in ("import", "export"):
                run = runs.get(f"{tool}_e2e_{what}")
                s[f"{tool}_e2e_{what}"].append(run["wall_s"] if run and run["rc"] == 0 else None)
            run = runs.get(f"{tool}_e2e_import")
            s[f"{tool}_mcore_gb"].append(run["mcore_bytes"] / 1e9 if run and run["rc"] == 0 else None)
        for what in ("import", "export"):
            a, b = s[f"sb_e2e_{what}"][-1], s[f"mb_e2e_{what}"][-1]
            s[f"e2e_{what}_vs_mb"].append(b / a if a and b else None)
        s["load1"] += [r["load1"] for r in runs.values() if isinstance(r, dict) and "load1" in r]
        s["exact"] += [r.get("exact") for k, r in runs.items() if "exact" in r]
    return {key: {k: (_spread(v) if k != "exact" else {"bit_exact": sum(x is True for x in v),
                                                            "of": sum(x is not None for x in v)})
                  for k, v in s.items()} for key, s in summary.items()}


def _f(spread, unit="s", digits=2) -> str:
    if not spread:
        return "—"
    if spread["n"] == 1:
        return f"{spread['median']:.{digits}f}{unit}"
    return f"{spread['median']:.{digits}f}{unit} ({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"


def markdown(result: dict) -> str:
    lines = ["## Side by side with Megatron-Bridge", "",
             "Medians over rounds, (min–max) after them; `×` columns are MB's time / specbridge's time, paired per "
             "round (higher is better for specbridge). Floor: the faster of reading every tensor once into freshly "
             "allocated memory (safetensors mmap + copy, or one read per tensor), and the faster of writing the same "
             "bytes once with `save_file` per shard (through the page cache) or with O_DIRECT through one reused "
             "aligned buffer. Load average (1 min) over the runs: "
             f"{_f(_spread([x for s in result['summary'].values() for x in [s['load1']['median']] if s['load1']]), '', 1)}"
             f"; start {result['loadavg_start'][0]:.1f}, end {result['loadavg_end'][0]:.1f}.", "",
             "In process: | workload | sb import | MB import | import × | import / floor | sb export | MB export | "
             "export × | export / floor | sb import RSS growth (bound) | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines[-2] = lines[-2].removeprefix("In process: ")
    lines.insert(-2, "**In process** (import = HF → bf16 Megatron model in memory: specbridge `from_pretrained` + "
                    "`build_model` + `import_weights`, MB `from_hf_pretrained` + provider + "
                    "`provide_distributed_model`; libraries, each tool's own modules, megatron-core's GPT model code and the transformers configuration module of the "
                    "workload's model type imported before the clock on both sides, as MB's own package import loads "
                    "them; export = model → HF safetensors):")
    lines.insert(-2, "")
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {_f(s['sb_import'])} | {_f(s['mb_import'])} | {_f(s['import_vs_mb'], '×')} | "
                     f"{_f(s['import_vs_floor'], '×')} | {_f(s['sb_export'])} | {_f(s['mb_export'])} | "
                     f"{_f(s['export_vs_mb'], '×')} | {_f(s['export_vs_floor'], '×')} | "
                     f"{_f(s['sb_peak_rss_gb'], ' GB')} ({_f(s['rss_bound_gb'], ' GB')}) | "
                     f"{s['exact']['bit_exact']}/{s['exact']['of']} |")
    floored = {key: s for key, s in result["summary"].items() if s["mb_import_vs_floor"]}
    if floored:
        lines += ["", "**Both tools against the floor** (single process; whole import and export as in the table "
                  "above, over the same round's floor; a ratio of 2× to MB needs specbridge at half MB's figure):", "",
                  "| workload | sb import / floor | MB import / floor | sb export / floor | MB export / floor |",
                  "|---|---|---|---|---|"]
        for key, s in floored.items():
            lines.append(f"| {key} | {_f(s['sb_whole_import_vs_floor'], '×')} | {_f(s['mb_import_vs_floor'], '×')} | "
                         f"{_f(s['export_vs_floor'], '×')} | {_f(s['mb_export_vs_floor'], '×')} |")
    lines += ["", "**End to end** (whole processes, start-up included: `specbridge import HF DIR` / `specbridge export "
              "DIR HF` against Megatron-Bridge's `import_ckpt` body / `export_ckpt`; each export reads its tool's "
              "Megatron checkpoint from the device, its pages dropped from the page cache after a sync):", "",
              "| workload | sb import | MB import | × | sb export | MB export | × | Megatron checkpoint sb / MB |",
              "|---|---|---|---|---|---|---|---|"]
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {_f(s['sb_e2e_import'])} | {_f(s['mb_e2e_import'])} | {_f(s['e2e_import_vs_mb'], '×')} "
                     f"| {_f(s['sb_e2e_export'])} | {_f(s['mb_e2e_export'])} | {_f(s['e2e_export_vs_mb'], '×')} | "
                     f"{_f(s['sb_mcore_gb'], ' GB')} / {_f(s['mb_mcore_gb'], ' GB')} |")
    lines += ["", "**Streaming weight sync** (`Converter.iter_hf_weights`, 512 MiB buckets, against MB's "
              "`export_hf_weights(cpu=True)`; each tool streams the whole model 1 + "
              f"{STREAM_AGAIN} times in a row, as a sync runs every training step: the first pass, and the median of "
              "the passes after it):", "",
              "| workload | sb GB/s, first | MB GB/s, first | × first | sb GB/s, after | MB GB/s, after | × after |",
              "|---|---|---|---|---|---|---|"]
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {_f(s['sb_stream_GBps'], '')} | {_f(s['mb_stream_GBps'], '')} | "
                     f"{_f(s['stream_vs_mb'], '×')} | {_f(s['sb_stream_steady_GBps'], '')} | "
                     f"{_f(s['mb_stream_steady_GBps'], '')} | {_f(s['stream_steady_vs_mb'], '×')} |")
    h = result["help_s"]
    if result.get("partial"):
        lines += ["", f"Partial record: {result['partial']} done when this was written."]
    lines += ["", f"`specbridge --help`: median {statistics.median(h):.2f} s (min {min(h):.2f}, max {max(h):.2f}, "
              f"{len(h)} fresh processes).", ""]
    return "\n".join(lines)
