"""The `specbridge` command line.

    specbridge check SPEC --config CONFIG [--lora]   coverage proof against both manifests (and of the LoRA plan)
    specbridge explain SPEC --config CONFIG NAME     how one tensor (either side) is derived
    specbridge compile SPEC -o bridge.py             standalone bridge module
    specbridge import HF_DIR OUT [--adapter PEFT]    HF checkpoint (+ PEFT LoRA adapter) -> Megatron dist checkpoint
    specbridge export MCORE_DIR OUT                  Megatron dist checkpoint -> HF checkpoint
               [--adapter-only | --merge]            ... its LoRA adapter as a PEFT adapter / merged into the weights
    specbridge roundtrip HF_DIR                      HF -> Megatron -> HF, exit 0 only if bit-exact
    specbridge parity HF_DIR                         fp32 logits vs transformers
    specbridge demo                                  the main job on an embedded tiny model

Every command runs multi-rank under torchrun with --tp/--pp/--ep/--etp/--vpp; progress shows on rank 0 only.
Spec and checkpoint errors are printed without a traceback, and the exit status is 2.

Start-up: this module imports only the standard library; input paths are checked (`specbridge.inputs`) before a
command imports torch, megatron-core or transformers, so `--help` and a wrong path answer at once. Warnings
of the dependencies that the user cannot act on (megatron-core's "Transformer Engine and Apex are not
installed", its internal deprecations) are silenced unless `--verbose`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


DEMO_FAMILIES = ("llama", "llama_tied", "qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_unnormed", "qwen3_moe_mixed",
                 "qwen2", "mistral", "mixtral", "phi3", "gemma3", "gemma4_moe", "gemma4_dense", "gemma4_e2b",
                 "gemma4_e4b", "gemma4_vlm", "gemma4_vlm_dense", "gemma4_e2b_vlm", "gemma4_e4b_vlm", "deepseek_v3",
                 "deepseek_v3_q_proj")
# (specbridge.demo.FAMILIES; tests/test_cli.py keeps the two equal)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specbridge", description="Proved-correct weight conversion between "
                                     "Hugging Face Transformers and Megatron-Core.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show the dependencies' warnings (e.g. megatron-core's missing Transformer Engine)")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # every command takes --verbose

    def parallel_flags(p):
        for flag in ("tp", "pp", "ep"):
            p.add_argument(f"--{flag}", type=int, default=1, help=f"{flag.upper()} size")
        p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
        p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")

    def spec_flags(p, positional: bool):
        if positional:
            p.add_argument("spec", help="spec file or built-in spec name")
            p.add_argument("--config", required=True, help="HF config.json or checkpoint directory")
        else:
            p.add_argument("--spec", default=None, help="spec file or built-in name (default: from config.json)")
        p.add_argument("--architecture", default=None, help="HF architecture (default: from config.json)")
        p.add_argument("--format", default=None, help="HF on-disk format of the spec, one of its hf.formats, e.g. "
                       "fused or per_expert (default: detected from the keys)")

    p = sub.add_parser("check", help="prove coverage of SPEC for CONFIG")
    spec_flags(p, True)
    p.add_argument("--lora", action="store_true", help="also prove the LoRA adapter plan derived from the spec")
    p = sub.add_parser("explain", help="how one tensor name (either side) is derived")
    spec_flags(p, True)
    p.add_argument("name", help="a tensor name of either side (HF key or Megatron parameter), or a LoRA adapter key")
    p = sub.add_parser("compile", help="emit a standalone bridge module")
    p.add_argument("spec", help="spec file or built-in spec name")
    p.add_argument("-o", "--output", required=True, help="the Python module to write (an existing file is refused "
                   "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT file")
    overwrite_help = "replace OUT if it holds an earlier output of specbridge (and nothing else)"
    dtype_choices = ("float32", "bfloat16", "float16")
    p = sub.add_parser("import", help="HF checkpoint -> Megatron distributed checkpoint")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("out", help="the Megatron checkpoint directory to write")
    spec_flags(p, False)
    parallel_flags(p)
    p.add_argument("--dtype", choices=dtype_choices, default=None,
                   help="parameter dtype (default: the checkpoint's; every tensor cast is reported)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                   help="also convert this PEFT LoRA adapter (the Megatron checkpoint holds both)")
    p.add_argument("--layer-spec", choices=("te", "local"), default=None,
                   help="write the checkpoint keys of a TransformerEngine layer-spec model (te: what multi-GPU "
                        "Megatron training builds; the default for GPT models) or of megatron-core's local spec "
                        "(--transformer-impl local)")
    p = sub.add_parser("export", help="Megatron distributed checkpoint -> HF checkpoint")
    p.add_argument("mcore_dir", help="a Megatron checkpoint written by specbridge import")
    p.add_argument("out", help="the HF checkpoint directory (or PEFT adapter directory) to write")
    parallel_flags(p)
    p.add_argument("--spec", default=None, help="the spec the checkpoint was written with (default: the recorded "
                   "one; its content digest must match the checkpoint's record)")
    p.add_argument("--format", default=None, help="HF on-disk format to write, one of the spec's hf.formats, e.g. "
                   "fused or per_expert (default: the one imported)")
    p.add_argument("--dtype", choices=dtype_choices, default=None,
                   help="HF tensor dtype (default: the Megatron checkpoint's)")
    p.add_argument("--absent", choices=("check", "drop"), default="check",
                   help="absent projections: assert they still follow their policy (default) or drop them")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--adapter-only", action="store_true",
                   help="write the checkpoint's LoRA adapter as a PEFT adapter (adapter_model.safetensors)")
    p.add_argument("--merge", action="store_true", help="write the HF checkpoint with the LoRA adapter merged")
    p = sub.add_parser("roundtrip", help="HF -> Megatron -> HF; exit 0 only if bit-exact")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    spec_flags(p, False)
    parallel_flags(p)
    p.add_argument("--keep", default=None, help="keep the exported HF checkpoint here")
    p = sub.add_parser("parity", help="fp32 logits of the converted model vs transformers")
    p.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    spec_flags(p, False)
    parallel_flags(p)
    p.add_argument("--atol", type=float, default=None, help="also require max |logit diff| <= ATOL")
    p.add_argument("--min-cosine", type=float, default=None, help="require cosine >= this (default 0.99999)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence compared (default 32)")
    p = sub.add_parser("demo", help="convert an embedded tiny model HF -> Megatron -> HF and prove it")
    p.add_argument("--family", default="qwen3_moe", choices=DEMO_FAMILIES, help="the embedded tiny model")
    return parser


def run() -> None:
    """The `specbridge` program (console script and `python -m specbridge`): `main` in a process of its own, so
    Python's cyclic garbage collector may stay off while the libraries load (their ~300k objects made it traverse
    the heap again and again: 0.5-1 s of a command) and skip them when the interpreter exits (1-2 s more): see
    `_libraries_loaded`. `main` itself, called in a process that goes on, leaves the collector alone."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    gc.disable()
    try:
        code = main()
    finally:
        gc.freeze()  # the process ends: its objects need no traversal, only the exit
    sys.exit(code)


_OWN_PROCESS = False


def _libraries_loaded() -> None:
    """The heavy libraries are imported (torch, megatron-core): what they allocated lives as long as the process,
    so it is moved out of the collector's generations, which collect the command's own garbage from here on."""
    if _OWN_PROCESS:
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_dependencies(args.verbose)
    from .errors import SpecbridgeError, SpecError

    try:
        _check_inputs(args)
        return COMMANDS[args.command](args)
    except SpecbridgeError as exc:  # a user's mistake: one clean report, exit 2; anything else is a bug (traceback)
        _report(exc, exc.render() if isinstance(exc, SpecError) else f"specbridge {args.command}: error: {exc}")
        return 2


def _report(exc, text: str) -> None:
    """Print the error once: an error every rank raised is printed by rank 0 only, and the other ranks leave after
    it has been printed. Every rank's exit status is 2: this rank is leaving anyway, so torchrun's SIGTERM (sent to
    the rest once one rank has left) is ignored rather than turning the status into a kill (an ignored signal
    stays ignored while the interpreter shuts down; a handler would not)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _is_rank0() or not exc.on_every_rank:
        print(text, file=sys.stderr, flush=True)
    if exc.on_every_rank:
        _barrier()


def _barrier() -> None:
    """Wait for every rank (when several run); a rank that has already gone ends the wait."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank that died does not change this rank's report
            pass


# ---------------------------------------------------------------- helpers

# (module, category, message) of warnings nobody running the command can act on: how megatron-core was
# installed (no Transformer Engine or Apex on a CPU machine), its internal deprecations, and the deprecations
# torch's distributed checkpointing raises for megatron-core's own calls
QUIET_WARNINGS = (
    (r"megatron(\..*)?$", Warning, ""),
    (r"torch\.distributed\.checkpoint(\..*)?$", FutureWarning, ""),
)


def _quiet_dependencies(verbose: bool) -> None:
    """Install the warning filters before megatron-core is imported (its warnings fire at import time)."""
    if verbose:
        return
    for module, category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _check_inputs(args) -> None:
    """The paths a command reads, checked before it imports anything heavy (a wrong path answers at once); a
    spec is also parsed and validated first (its errors come before any other file is read, as in the API)."""
    from . import compiler, inputs

    if getattr(args, "spec", None) is not None:
        compiler.load(inputs.spec_path(args.spec))
    for name in ("config", "hf_dir"):
        if getattr(args, name, None) is not None:
            inputs.hf_config_file(getattr(args, name))
    if getattr(args, "mcore_dir", None) is not None:
        inputs.existing_dir(args.mcore_dir)


def _init(args):
    from .runtime.parallel import init_parallel

    topology = init_parallel(tp=getattr(args, "tp", 1), pp=getattr(args, "pp", 1), ep=getattr(args, "ep", 1),
                             etp=getattr(args, "etp", None), vpp=getattr(args, "vpp", None))
    _libraries_loaded()
    return topology


def _is_rank0() -> bool:
    """Rank 0 of the torch.distributed world (before it is initialised: of the processes torchrun started)."""
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        return sys.modules["torch.distributed"].get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _say(text: str) -> None:
    if _is_rank0():
        print(text, flush=True)


def _progress(total: int, what: str):
    """A tqdm bar on rank 0; a no-op elsewhere. Returns (update, close)."""
    if not _is_rank0() or not sys.stderr.isatty() and os.environ.get("SPECBRIDGE_PROGRESS") != "1":
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="tensor", leave=False)
    return bar.update, bar.close


def _converter_from_args(args, config_source):
    from .api import Converter

    return Converter.from_config(config_source, args.spec, args.architecture, args.format)


# ---------------------------------------------------------------- commands


def cmd_check(args) -> int:
    _init(args)
    if args.format is None and Path(args.config).is_dir():  # a checkpoint: its on-disk format, as import detects it
        from .api import Converter

        conv = Converter.from_pretrained(args.config, args.spec, args.architecture)
    else:
        conv = _converter_from_args(args, args.config)
    hf, mcore = conv.manifests()  # the Megatron model on the meta device: no memory at any size
    plan = conv.check(manifests=(hf, mcore))
    tied = sum(1 for s in plan.sentinels)
    _say(f"{plan.spec} ({plan.architecture}, format '{plan.format}'): coverage proved")
    _say(f"  hf:    {len(hf.tensors)} tensors, each consumed exactly once or named by a sentinel")
    _say(f"  mcore: {len(mcore.tensors)} tensors, each produced exactly once or named by a sentinel")
    _say(f"  {len(plan.mappings)} mappings from {len({m.rule for m in plan.mappings})} rules, {tied} sentinels, "
         f"{sum(1 for m in plan.mappings if not m.exact)} inexact")
    if args.lora:
        chunks = conv.build_model()
        conv.add_adapter(chunks, rank=8)
        adapter = conv.check_adapter(chunks, rank=8)
        _say(f"  LoRA: {len(adapter.targets)} adapted linears, {2 * len(adapter.targets)} adapter tensors on each side "
             f"(PEFT lora_A/lora_B, Megatron adapter.linear_in/linear_out), derived from the base rules: proved")
    return 0


def cmd_explain(args) -> int:
    from .compiler import adapters
    from .compiler.explain import explain

    conv = _converter_from_args(args, args.config)
    if ".lora_A." in args.name or ".lora_B." in args.name or ".adapter.linear_" in args.name:
        print(adapters.explain(conv.adapter_plan, args.name, conv.spec.texts))
    else:
        print(explain(conv.plan, args.name, conv.spec.texts))
    return 0


def cmd_compile(args) -> int:
    from . import compiler
    from .compiler.emit import emit_module
    from .inputs import spec_path

    from .errors import UsageError

    path = spec_path(args.spec)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UsageError(f"'{output}' exists; pass --overwrite to replace it")
    text = emit_module(compiler.load(path))
    staged = output.with_name(f".{output.name}.specbridge-tmp")
    try:  # written beside the target, then renamed: never a half-written module
        staged.write_text(text)
        os.replace(staged, output)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise UsageError(f"cannot write '{output}': {exc.strerror or exc}") from None
    print(f"wrote {args.output} from {path}")
    return 0


def _layer_spec(choice: str | None, plan) -> str:
    """The layer spec whose checkpoint keys `import` writes: TE's for megatron-core's GPTModel unless told
    otherwise. Other models (Gemma 4's decoder) and multi-latent attention (whose TE keys `te_keys` does not
    write yet) have only the local spec's."""
    from .errors import UsageError

    why = (f"spec '{plan.spec}' builds megatron model '{plan.model}', which has no TransformerEngine layer spec in "
           f"megatron-core" if plan.model != "gpt" else
           f"spec '{plan.spec}' uses multi-latent attention, whose TransformerEngine keys specbridge does not write"
           if plan.transformer_kwargs().get("multi_latent_attention") else None)
    if why is None:
        return choice or "te"
    if choice == "te":
        raise UsageError(f"--layer-spec te: {why}; use --layer-spec local")
    return "local"


def cmd_import(args) -> int:
    from .api import Converter, builtin_specs
    from .compiler import config_record
    from .runtime import collectives, dtypes, mcore_checkpoint
    from .runtime.safetensors_io import CheckpointReader

    collectives.check_output(args.out, args.overwrite, inputs=[args.hf_dir])  # before any work
    topology = _init(args)
    conv = Converter.from_pretrained(args.hf_dir, args.spec, args.architecture, args.format)
    layer_spec = _layer_spec(args.layer_spec, conv.plan)
    reader = CheckpointReader(args.hf_dir)
    params_dtype = dtypes.parse_choice(args.dtype) or dtypes.checkpoint_dtype(reader)
    casts = dtypes.import_casts(conv.plan, reader, params_dtype)
    chunks = conv.build_model(params_dtype=params_dtype)
    update, close = _progress(len(conv.plan.mappings), "import")
    conv.import_weights(chunks, args.hf_dir, progress=update, cast=args.dtype is not None)
    close()
    settings = conv.import_adapter(chunks, args.adapter) if args.adapter else None
    builtin = conv.spec_path.resolve() in {p.resolve() for p in builtin_specs().values()}
    spec_files, uncarried = mcore_checkpoint.spec_copy(conv.spec)
    metadata = mcore_checkpoint.conversion_metadata(conv.plan, conv.spec_path.stem if builtin else conv.plan.spec,
                                                    builtin, conv.source_config, params_dtype, topology,
                                                    conv.spec_path.name)
    reads = config_record.record(conv.spec, conv.hf_config, conv.plan.architecture, conv.plan.format, conv.plan,
                                 conv.source_config)
    if reads is not None:  # what lets the export compile its plan without transformers
        metadata["config_reads"] = reads
    metadata["padded_vocab_size"] = chunks[0].vocab_size  # a later load at another TP builds the same rows
    model_kwargs = {**conv.plan.model_kwargs(), "vocab_size": chunks[0].vocab_size}  # Megatron's padded_vocab_size
    if settings is not None:
        metadata["adapter"] = {**settings.to_json(), "base_model": str(args.hf_dir)}
    mcore_checkpoint.save(chunks, args.out, metadata, overwrite=args.overwrite, spec_files=spec_files,
                          hf_dir=args.hf_dir, model_kwargs=model_kwargs, layer_spec=layer_spec)
    if casts:
        _say(f"import: {dtypes.summary(casts)}")
    if uncarried and not builtin:
        _say(f"import: the spec extends {', '.join(uncarried)}, outside its folder, which the checkpoint does not "
             f"carry: export it where that file is at hand, or pass --spec")
    with_adapter = f", with the LoRA adapter {args.adapter}" if args.adapter else ""
    _say(f"import: {args.hf_dir} -> {args.out} (Megatron checkpoint, {dtypes.short(params_dtype)}, "
         f"{len(conv.plan.mappings)} tensors{with_adapter})")
    return 0


def cmd_export(args) -> int:
    from .errors import UsageError
    from .runtime import collectives, dtypes, mcore_checkpoint, parallel

    if args.adapter_only and args.merge:
        raise UsageError("--adapter-only and --merge exclude each other")
    collectives.check_output(args.out, args.overwrite, inputs=[args.mcore_dir])  # before any work
    wanted = dtypes.parse_choice(args.dtype)
    parallel.init_world(args.tp, args.pp, args.ep, args.etp, args.vpp)
    meta = mcore_checkpoint.read_metadata(args.mcore_dir)
    adapter = meta.get("adapter")
    if (args.adapter_only or args.merge) and not adapter:
        raise UsageError(f"the Megatron checkpoint '{args.mcore_dir}' holds no LoRA adapter")
    spec = mcore_checkpoint.recorded_spec(args.mcore_dir, meta, args.spec)
    direct = not adapter and "tensor_shapes" in meta  # read straight from the checkpoint's files: no model built
    conv = _export_converter(meta, spec, args.format or meta["format"], recorded_reads=direct)
    _libraries_loaded()
    update, close = _progress(len(conv.plan.mappings), "export")
    export = dict(dtype=wanted, check_absent=args.absent == "check", overwrite=args.overwrite, progress=update,
                  carry=mcore_checkpoint.carried_files(args.mcore_dir, meta), inputs=[args.mcore_dir])
    tensors = mcore_checkpoint.read_tensors(args.mcore_dir, meta, conv.expanded_plan()) if direct else None
    if tensors is not None:
        with tensors:
            conv.export_weights(tensors, args.out, **export)
        stored = tensors.dtype
    else:
        stored = _export_through_model(args, conv, meta, export)
        if stored is None:
            return 0
    close()
    if wanted is not None and wanted != stored:
        _say(f"export: cast every tensor {dtypes.short(stored)} -> {dtypes.short(wanted)}")
    merged = " with the LoRA adapter merged" if args.merge else ""
    _say(f"export: {args.mcore_dir} -> {args.out} (HF format '{conv.plan.format}'{merged})")
    return 0


def _export_converter(meta, spec, fmt: str, recorded_reads: bool):
    """The export's converter: its plan compiled from the config reads the import recorded (no transformers is
    imported) when `recorded_reads` and the record serves this spec, else from transformers' config."""
    import dataclasses

    from .api import Converter, hf_config_from_dict
    from .compiler import config_record

    view = config_record.recorded(meta.get("config_reads"), meta["hf_config"]) if recorded_reads else None
    conv = None
    if view is not None:
        try:
            conv = Converter.from_config(view, spec, meta["architecture"], fmt)
        except config_record.NotRecorded:  # another spec reads more than the import's did
            conv = None
        if conv is not None and conv.plan.digest != view.spec_digest:
            conv = None
    if conv is None:
        conv = Converter.from_config(hf_config_from_dict(meta["hf_config"]), spec, meta["architecture"], fmt)
    return dataclasses.replace(conv, source_config=meta["hf_config"])


def _export_through_model(args, conv, meta, export):
    """Export by loading the checkpoint into a model at the flags' layout: a checkpoint with a LoRA adapter, or
    one that records no tensor shapes (earlier versions). The parameters' dtype; None when only the adapter was
    written."""
    from .runtime import dtypes, mcore_checkpoint
    from .runtime.lora import LoraSettings

    _init(args)
    params_dtype = dtypes.CHOICES.get(meta.get("dtype")) or mcore_checkpoint.tensor_dtype(args.mcore_dir)
    chunks = conv.build_model(params_dtype=params_dtype, padded_vocab=meta.get("padded_vocab_size",
                                                                               conv.plan.model_kwargs().get("vocab_size")))
    adapter = meta.get("adapter")
    settings = conv.restore_adapter(chunks, LoraSettings.from_json(adapter)) if adapter else None
    mcore_checkpoint.load(chunks, args.mcore_dir)
    if args.adapter_only:
        conv.export_adapter(chunks, args.out, settings, export["check_absent"], args.overwrite,
                            adapter.get("base_model"))
        _say(f"export: {args.mcore_dir} -> {args.out} (PEFT LoRA adapter)")
        return None
    if args.merge:
        conv.export_merged(chunks, args.out, settings, **export)
    else:
        conv.export_weights(chunks, args.out, **export)
    return chunks[0].config.params_dtype


def cmd_roundtrip(args) -> int:
    from .verify import roundtrip

    _init(args)
    result = roundtrip(args.hf_dir, args.keep, spec=args.spec)
    _say(result.summary())
    for key in (result.mismatched + result.missing + result.unexpected)[:10]:
        _say(f"  {key}")
    return 0 if result.exact else 1


def cmd_parity(args) -> int:
    from .verify import MIN_COSINE, parity

    _init(args)
    result = parity(args.hf_dir, spec=args.spec, seq_len=args.seq_len)
    min_cosine = MIN_COSINE if args.min_cosine is None else args.min_cosine
    _say(result.summary(min_cosine, args.atol))
    return 0 if result.ok(min_cosine, args.atol) else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    _init(args)
    report = run_demo(args.family)
    print(json.dumps(report, indent=2))
    return 0 if report["roundtrip_bit_exact"] and report["parity_ok"] else 1


COMMANDS = {"check": cmd_check, "explain": cmd_explain, "compile": cmd_compile, "import": cmd_import,
            "export": cmd_export, "roundtrip": cmd_roundtrip, "parity": cmd_parity, "demo": cmd_demo}

if __name__ == "__main__":
    run()
