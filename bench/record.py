"""The record of a bench run: the side-by-side part (bench/sidebyside) and <results>/latest.json + latest.md
(rewritten after every side-by-side unit, so an interrupted run still leaves its figures)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import environment
from bench.report import markdown

HERE = Path(__file__).resolve().parent


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
