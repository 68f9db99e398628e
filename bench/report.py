"""The results as markdown: the tables of one run and its verdicts against the targets."""

from __future__ import annotations

from .machine import GB


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def fmt_gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# specbridge benchmark — Gemma 4 26B-A4B geometry",
             "",
             f"Measured {results['when']} on {env['machine']} ({env['cpus']} CPUs, {env['ram_gb']:.0f} GiB RAM, no "
             f"GPU); torch {env['torch']}, megatron-core {env['megatron_core']}, transformers {env['transformers']}, "
             f"safetensors {env['safetensors']}. Page cache: "
             + ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every read measurement: cold reads "
                "as far as this machine goes (a VM's host may still cache its disk); buffered writes go to the page "
                "cache after one `sync`." if results["cold_cache"] else "NOT dropped (warm-cache reads).")
             + f" Load average at start / end: {results['loadavg_start'][0]:.1f} / {results['loadavg_end'][0]:.1f}.",
             "",
             "Floor: read every tensor once into freshly allocated memory (one read() per tensor into its own "
             "tensor, the tensors kept, as parameters are: their pages are first touched by the read, as an import's "
             "are; in brackets, the same bytes read into one reused, pre-faulted buffer, without that first touch), "
             "write the same bytes once from memory (the faster of `save_file` per shard, through the page cache, "
             "and an "
             "O_DIRECT write through one reused aligned buffer). The read floor is the smaller of two cold reads, "
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
            f"| {run['layers']} | {fmt_gb(fl['bytes'])}, {run['checkpoint']['shards']} shards | "
            f"{fl['read_s']:.2f} s ({fl['read_GBps']:.2f} GB/s; {_reused(fl)}) | "
            f"{fl['write_s']:.2f} s ({fl['write_GBps']:.2f} GB/s) | "
            f"{cv['build_s']:.2f} s | {cv['import_s']:.2f} s | **{run['import_ratio']:.2f}x** | "
            f"{cv['export_s']:.2f} s | **{run['export_ratio']:.2f}x** | {fmt_gb(cv['import_peak_extra'])} | "
            f"{fmt_gb(cv['export_peak_extra'])} | {cv.get('roundtrip', 'not verified').split(':')[1].strip() if cv.get('roundtrip') else 'not verified'} |")
    comp = results["compile"]
    lines += ["",
              f"Largest fused tensor of one layer (experts.gate_up_proj): {fmt_gb(results['largest_fused_bytes'])}; "
              f"largest tensor (embed_tokens): {fmt_gb(results['largest_tensor_bytes'])}.",
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
            peaks = " / ".join(fmt_gb(x["export_peak_extra"]) for x in r["ranks"])
            trip = r["roundtrip"].split(":")[1].strip() if r.get("roundtrip") else "not verified"
            lines.append(f"| {r['layers']} | {layout} | {r['build_s']:.2f} s | {r['import_s']:.2f} s | "
                         f"**{r['import_ratio']:.2f}x** | {r['export_s']:.2f} s | **{r['export_ratio']:.2f}x** | "
                         f"{fmt_gb(r['import_bytes_read'])} | {fmt_gb(r['import_peak_extra'])} | {peaks} | {trip} |")
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
        lines.append(f"- peak extra memory flat in layers ({', '.join(fmt_gb(p) for p in peaks)}): "
                     f"{_verdict(max(peaks) <= 1.1 * min(peaks) + 0.05 * GB)}")
    lines.append(f"- compile cold {results['compile']['cold_s']:.3f} s: {_verdict(results['compile']['cold_s'] < 1)}")
    return "\n".join(lines) + "\n"


def _reused(floor: dict) -> str:
    reused = floor.get("read_reused_s")
    return "reused buffer: not measured" if reused is None else f"reused buffer {reused:.2f} s"
