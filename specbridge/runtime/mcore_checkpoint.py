"""Megatron checkpoints as Megatron-LM's training loader reads them (megatron-core `dist_checkpointing`, torch_dist).

`save` writes (all ranks at once, into a staging directory that rank 0 renames into place when every rank is done):

    OUT/latest_checkpointed_iteration.txt   "release" (the tracker Megatron-LM's --load / --pretrained-checkpoint reads)
    OUT/release/                            the distributed checkpoint: metadata.json, .metadata, *.distcp, and the
                                            common state: checkpoint_version 3.0, iteration 0, `args` (the model
                                            arguments Megatron-LM checks or takes with --use-checkpoint-args)
    OUT/release/run_config.yaml             the `model` section Megatron-Bridge reads
    OUT/specbridge.json                     how to convert back: spec name and content digest, architecture, HF
                                            format, the source config.json, parameter dtype, carried HF files
    OUT/spec/                               the spec used, exact copies (their digest is recorded): the file and
                                            the files of its `extends` chain that sit beside or below it
    OUT/hf/                                 HF files carried over to the export (generation config, tokenizer,
                                            chat template)

`specbridge.json` also records every checkpoint key's global shape, so that `read_tensors` can read the tensors
directly (`dist_tensors`: no model, no megatron-core); `load` fills a model instead (a LoRA checkpoint, one of an
earlier version). Both read this layout and the bare one of earlier versions (the distributed checkpoint at the
top). A checkpoint
is untrusted input: paths come only from fixed names inside it (never from its contents), its pickles (`.metadata`,
`common.pt`, the byte items of `*.distcp`) are vetted by restricted unpicklers before megatron-core's loader, which
unpickles them without restriction, ever sees them, and a damaged checkpoint is one `ConversionError`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import pickle
import queue
import shutil
from pathlib import Path

import torch

from ..compiler import config_record
from ..errors import ConversionError, UsageError
from . import collectives, dist_metadata, dtypes, file_writes, te_keys
from .dist_tensors import DistTensors
from .safetensors_io import shard_path

METADATA = "specbridge.json"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
RUN_CONFIG = "run_config.yaml"
SPEC_DIR = "spec"
OLD_SPEC_COPY = "spec.yaml"  # format 2 checkpoints: one file at the top
HF_FILES = "hf"
FORMAT_VERSION = 3
CHECKPOINT_VERSION = 3.0
# the HF files an export carries over from the source checkpoint (besides weights and config.json)
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
           "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")


# ---------------------------------------------------------------- writing


def _sharded_state_dict(chunks, layer_spec: str = "local", present: set[str] | None = None) -> dict:
    """The chunks' sharded state dicts, under the keys of `layer_spec` (`te_keys`): for writing; or, given the keys
    `present` in a checkpoint, for reading it (a MoE norm under whichever key it holds)."""
    from .parallel import current_topology

    def one(chunk):
        sharded = chunk.sharded_state_dict()
        if layer_spec == "te" or present is not None:
            sharded = te_keys.te_sharded_state_dict(chunk, sharded, current_topology(), extra_state=present is None,
                                                    present=present)
        return sharded

    if len(chunks) == 1:
        return {"model": one(chunks[0])}
    return {f"model{k}": one(chunk) for k, chunk in enumerate(chunks)}


def save(chunks, target: str | Path, metadata: dict, overwrite: bool = False, spec_files: dict | None = None,
         hf_dir: str | Path | None = None, model_kwargs: dict | None = None, layer_spec: str = "local") -> Path:
    """Write the checkpoint of `chunks` (every rank its shards) with `metadata` (see `conversion_metadata`), the
    spec's files (`spec_copy`), and the HF files of `hf_dir` that an export carries over; with the keys of a
    TransformerEngine layer-spec model (`layer_spec="te"`, see `te_keys`) or of the local spec (recorded in
    `specbridge.json`)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    config = chunks[0].config
    with collectives.staged_output(target, overwrite, inputs=[hf_dir] if hf_dir else ()) as staging:
        release = staging / RELEASE
        if collectives.world()[0] == 0:
            release.mkdir()
        collectives.barrier()
        state = {**_sharded_state_dict(chunks, layer_spec), "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": 0, "args": megatron_args(config, model_kwargs or {}, layer_spec)}
        _local_results_queue()
        try:
            request = dist_checkpointing.save(state, str(release), async_sharded_save=True,
                                              **_own_async_request(dist_checkpointing.save))
            _written_by_threads(request).execute_sync()
        except (RuntimeError, CheckpointException) as exc:
            raise _write_failure(exc, release) or exc
        if collectives.world()[0] == 0:
            (staging / TRACKER).write_text(RELEASE)
            (release / RUN_CONFIG).write_text(run_config(config, model_kwargs or {}, layer_spec))
            carried = _carry(Path(hf_dir), staging / HF_FILES) if hf_dir else []
            for name, text in (spec_files or {}).items():
                (staging / SPEC_DIR / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / SPEC_DIR / name).write_text(text)
            metadata = {**metadata, "hf_files": carried, "layer_spec": layer_spec,
                        "tensor_shapes": dist_metadata.key_shapes(dist_metadata.read(release / ".metadata"))}
            (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return Path(target)


def _write_failure(exc: BaseException, where: Path) -> ConversionError | None:
    """megatron-core's writer reports what failed in its writer processes (an OSError, a full disk: torch's zip
    writer then fails with 'unexpected pos') as a RuntimeError: that is the environment's error, named with the
    space left; any other RuntimeError is a bug (None)."""
    seen, chain = exc, []
    while seen is not None:
        chain.append(seen)
        failures = getattr(seen, "failures", None)  # a CheckpointException: {rank: failure}
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            seen = first[0] if isinstance(first, tuple) and first else first
        else:
            seen = seen.__cause__ or seen.__context__
        seen = seen if isinstance(seen, BaseException) else None
    if not any(isinstance(e, OSError) or str(e).startswith("Worker failure") for e in chain):
        return None
    free = shutil.disk_usage(where).free
    return ConversionError(f"writing the Megatron checkpoint failed ({free} bytes free on its disk): "
                           f"{_first_line(chain[-1])}", rank=collectives.world()[0])


def _carry(hf_dir: Path, into: Path) -> list[str]:
    names = [n for n in CARRIED if (hf_dir / n).is_file()]
    if names:
        into.mkdir()
    for name in names:
        shutil.copyfile(shard_path(hf_dir, name), into / name)
    return names


def spec_copy(spec) -> tuple[dict[str, str], list[str]]:
    """The files of `spec` a checkpoint carries, by path relative to the spec file (the spec, then the bases of
    its `extends` chain beside or below it; built-in bases are found by name), and the bases it cannot carry."""
    from ..inputs import SPEC_DIR

    (top, text), builtin = spec.sources[-1] if spec.sources else (spec.file, spec.source), SPEC_DIR.resolve()
    here, files, left = Path(top).resolve().parent, {Path(top).name: text}, []
    for file, base_text in spec.sources[:-1]:
        path = Path(file).resolve()
        if path.parent == builtin:
            continue
        if path.is_relative_to(here):
            files[path.relative_to(here).as_posix()] = base_text
        else:
            left.append(file)
    return files, left


def conversion_metadata(plan, spec_name: str, builtin: bool, hf_config: dict, params_dtype: torch.dtype,
                        topology, spec_file: str) -> dict:
    """`specbridge.json`: portable (no path of the writing machine), enough to rebuild the model anywhere."""
    return {"format_version": FORMAT_VERSION,
            "spec": {"name": spec_name, "digest": plan.digest, "builtin": builtin, "file": f"{SPEC_DIR}/{spec_file}"},
            "architecture": plan.architecture, "format": plan.format, "hf_config": hf_config,
            "dtype": dtypes.short(params_dtype),
            "written_with": {"tp": topology.tp_size, "pp": topology.pp_size, "ep": topology.ep_size}}


# the TransformerConfig fields Megatron-LM's arguments carry under the same name, and those it renames
_SAME_NAME = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "normalization", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "moe_ffn_hidden_size",
              "moe_router_topk", "moe_router_pre_softmax", "moe_router_score_function", "moe_grouped_gemm",
              "moe_shared_expert_intermediate_size", "moe_layer_freq", "attention_dropout", "hidden_dropout",
              "apply_query_key_layer_scaling", "rotary_interleaved", "tensor_model_parallel_size",
              "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
              "expert_tensor_parallel_size", "params_dtype")
# and those of multi-latent attention (MLATransformerConfig), carried when the model has it
_MLA = ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
        "rope_type", "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim")
_ROUTER = ("moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk",
           "moe_router_topk_scaling_factor")
_RENAMED = {"layernorm_epsilon": "norm_epsilon", "gated_linear_unit": "swiglu", "num_moe_experts": "num_experts",
            "layernorm_zero_centered_gamma": "apply_layernorm_1p"}
_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def megatron_args(config, model_kwargs: dict, layer_spec: str = "local") -> argparse.Namespace:
    """The `args` Megatron-LM stores in its checkpoints, for the model arguments it checks when loading
    (`check_checkpoint_args`) or takes over (`--use-checkpoint-args`). Keys written for a TE layer spec say so
    (`transformer_impl`) and ask for grouped experts (TEGroupedMLP, which Megatron-LM takes from the checkpoint)."""
    mla = _MLA if getattr(config, "multi_latent_attention", False) else ()
    values = {name: getattr(config, name, None) for name in (*_SAME_NAME, *_ROUTER, *mla)}
    te = layer_spec == "te"
    values.update(transformer_impl="transformer_engine" if te else "local",
                  moe_grouped_gemm=bool(te and config.num_moe_experts) or bool(config.moe_grouped_gemm))
    values.update({new: getattr(config, old, None) for old, new in _RENAMED.items()})
    position = model_kwargs.get("position_embedding_type", "learned_absolute")
    values.update(
        padded_vocab_size=model_kwargs.get("vocab_size"), max_position_embeddings=model_kwargs.get("max_sequence_length"),
        seq_length=model_kwargs.get("max_sequence_length"), position_embedding_type=position,
        add_position_embedding=position == "learned_absolute", use_rotary_position_embeddings=position == "rope",
        # MLA's rotary base is a field of its config, the others' a GPTModel argument
        rotary_base=model_kwargs.get("rotary_base", getattr(config, "rotary_base", 10000)),
        rotary_percent=model_kwargs.get("rotary_percent", 1.0),
        untie_embeddings_and_output_weights=not model_kwargs.get("share_embeddings_and_output_weights", True),
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        bf16=config.params_dtype == torch.bfloat16, fp16=config.params_dtype == torch.float16,
        ckpt_format="torch_dist", iteration=0, consumed_train_samples=0, consumed_valid_samples=0)
    plain = {k: v for k, v in values.items() if isinstance(v, _PLAIN) or isinstance(v, list)
             and all(isinstance(x, int) for x in v)}
    return argparse.Namespace(**plain)


def run_config(config, model_kwargs: dict, layer_spec: str = "local") -> str:
    """Megatron-Bridge's `run_config.yaml`: the `model` section (GPT provider fields) of this model."""
    import yaml

    args = vars(megatron_args(config, model_kwargs, layer_spec))
    model = {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider"}
    model.update({k: v for k, v in vars(config).items() if isinstance(v, (bool, int, float, str))
                  and not k.startswith("_")})
    model.update(vocab_size=args["padded_vocab_size"], seq_length=args["seq_length"],
                 position_embedding_type=args["position_embedding_type"], rotary_base=args["rotary_base"],
                 share_embeddings_and_output_weights=not args["untie_embeddings_and_output_weights"],
                 params_dtype=dtypes.short(config.params_dtype), moe_grouped_gemm=args["moe_grouped_gemm"])
    return yaml.safe_dump({"model": model}, sort_keys=True)


def _own_async_request(save) -> dict:
    """megatron-core >= 0.19 hands an async save to nvidia-resiliency-ext unless told to make its own request."""
    import inspect

    return {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(save).parameters else {}


def _written_by_threads(request):
    """megatron-core's save as an async request whose writing runs on threads of this process (`_write_buckets`):
    megatron-core 0.16 forks a writer process per file (each fork copies the page tables of a process holding the
    whole model, and a kill mid-save would leave orphans); 0.19 writes on threads itself. Both fsync every file,
    which only waits for the disk: the checkpoint is usable once it is renamed into place, the staging directory of
    a killed run is never taken for a checkpoint, and specbridge's other outputs are not fsynced either."""
    if request.async_fn is None or request.async_fn.args[1:2] != (False,):  # nothing to write here / object storage
        return request
    return request._replace(async_fn=functools.partial(_write_buckets, request.async_fn.args[0]))


def _write_buckets(transforms, _rank, buckets, results) -> None:
    """Write each bucket (one file) on its own thread; its results, or the first failure, go where megatron-core's
    finalisation collects them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(buckets)) as pool:
        jobs = [pool.submit(_write_bucket, transforms, bucket) for bucket in buckets]
    failures = [error for error in (job.exception() for job in jobs) if error is not None]
    results.put(failures[0] if failures else {index: job.result() for index, job in enumerate(jobs)})


def _write_bucket(transforms, bucket) -> list:
    """One checkpoint file, as megatron-core's own per-file writer makes it (each item through torch's item writer,
    in the same order: the same bytes), but written direct (`file_writes.AppendedFile`): buffered, megatron-core's
    way, every 4 KiB takes a fresh page-cache page, on a machine whose idle memory the host takes back a fault on
    the host each (the 1.02 GB of a Llama import: 0.8-1.3 s buffered, 0.36-0.48 s direct, three runs each)."""
    import inspect

    from torch.distributed.checkpoint import filesystem

    path, storage_key, (byte_items, tensor_items) = bucket
    options = {}
    if "serialization_format" in inspect.signature(filesystem._write_item).parameters:
        options["serialization_format"] = filesystem.SerializationFormat.TORCH_SAVE
    with file_writes.AppendedFile(path) as stream:
        return [filesystem._write_item(*transforms, stream, data, item, storage_key, **options)
                for item, data in [*byte_items, *tensor_items]]


def _local_results_queue() -> None:
    """megatron-core would spawn a manager process for the queue of write results; this process's own suffices."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


# ---------------------------------------------------------------- reading


def read_metadata(directory: str | Path) -> dict:
    """`specbridge.json`, checked: a ConversionError naming the file for anything that is not what `save` wrote."""
    path = Path(directory) / METADATA
    if not Path(directory).is_dir():
        raise UsageError(f"'{directory}' does not exist or is not a directory")
    if not path.is_file():
        raise ConversionError(f"'{directory}' is not a specbridge Megatron checkpoint (no {METADATA})")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ConversionError(f"'{path}' is damaged: {exc}") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"'{path}' is damaged: not a JSON object")
    if "format_version" not in meta:  # earlier versions: the spec was a path (never followed) and a name
        meta = {**meta, "spec": {"name": meta.get("spec_name"), "digest": meta.get("digest"), "builtin": True}}
    _check_fields(path, meta, {"spec": dict, "architecture": str, "format": str, "hf_config": dict})
    _check_fields(path, meta["spec"], {"name": str, "digest": str})
    shapes = meta.get("tensor_shapes", {})
    if not isinstance(shapes, dict) or not all(isinstance(k, str) and isinstance(v, list) and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v) for k, v in shapes.items()):
        raise ConversionError(f"'{path}' is damaged: 'tensor_shapes' must map checkpoint keys to shapes")
    try:
        config_record.recorded(meta.get("config_reads"), meta["hf_config"])  # its shape, checked before any work
    except config_record.DamagedRecord as exc:
        raise ConversionError(f"'{path}' is damaged: 'config_reads': {exc}") from None
    files = meta.setdefault("hf_files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f in CARRIED for f in files):
        raise ConversionError(f"'{path}' is damaged: 'hf_files' must list carried HF files ({', '.join(CARRIED)})")
    return meta


def _check_fields(path: Path, meta: dict, fields: dict) -> None:
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind):
            raise ConversionError(f"'{path}' is damaged: '{name}' must be a {kind.__name__}, not "
                                  f"{type(meta.get(name)).__name__}")


def recorded_spec(directory: str | Path, meta: dict, override=None) -> Path:
    """The spec the checkpoint was written with, identified by name and content digest: the built-in spec of that
    name, else the checkpoint's own copy (`spec.yaml`), each only if its digest is the recorded one; or `override`
    (a file or built-in name), whose digest must also match. Never a path read from the checkpoint."""
    from .. import compiler
    from ..api import builtin_specs, resolve_spec_path
    from ..compiler.resolve import digest

    spec, directory = meta["spec"], Path(directory)
    candidates = [resolve_spec_path(override, None)] if override is not None else [
        p for p in (builtin_specs().get(spec["name"]) if spec.get("builtin") else None, *_spec_copies(directory, spec))
        if p is not None and p.is_file() and not p.is_symlink()]
    seen = []
    for path in candidates:
        if not path.is_file():
            raise UsageError(f"spec '{path}' does not exist")
        within = directory if path.resolve().is_relative_to(directory.resolve()) else None  # a copy: confined
        found = digest(compiler.load(path, within).merged_source)  # as plans record it: every file of the chain
        if found == spec["digest"]:
            return path
        seen.append(f"'{path}' has digest {found}")
    raise ConversionError(f"the checkpoint '{directory}' was written with spec '{spec['name']}' of digest "
                          f"{spec['digest']}, and no spec with that content is at hand ("
                          f"{'; '.join(seen) or 'no built-in spec of that name, no copy in the checkpoint'}): the "
                          f"spec changed since import; pass --spec with the spec it was written with")


def _spec_copies(directory: Path, spec: dict) -> list[Path]:
    """The checkpoint's copy of its spec: `spec/NAME.yaml` as recorded (a plain file name only), or the one file
    of format 2."""
    recorded = spec.get("file")
    name = recorded.removeprefix(f"{SPEC_DIR}/") if isinstance(recorded, str) else ""
    plain = name.endswith((".yaml", ".yml")) and "/" not in name and "\\" not in name and not name.startswith(".")
    return ([directory / SPEC_DIR / name] if plain else []) + [directory / OLD_SPEC_COPY]


def dist_directory(directory: str | Path) -> Path:
    """The distributed checkpoint inside a checkpoint directory: the tracker's `release/` or `iter_NNNNNNN/`, or
    the directory itself (bare layout)."""
    directory = Path(directory)
    tracker = directory / TRACKER
    if not tracker.is_file():
        if (directory / "metadata.json").is_file():
            return directory
        raise ConversionError(f"'{directory}' holds no Megatron checkpoint (no {TRACKER}, no metadata.json)")
    with open(tracker, "rb") as f:
        text = f.read(64).decode("ascii", "replace").strip()
    if text != RELEASE and not (text.isdigit() and len(text) <= 7):
        raise ConversionError(f"'{tracker}' names neither 'release' nor an iteration: {text[:20]!r}")
    inner = directory / (RELEASE if text == RELEASE else f"iter_{int(text):07d}")
    if inner.is_symlink() or not inner.is_dir():
        raise ConversionError(f"'{inner}', named by '{tracker}', is not a directory inside the checkpoint")
    return inner


def tensor_dtype(directory: str | Path) -> torch.dtype | None:
    """The dtype of most of the checkpoint's floating-point numbers (`dtypes.dominant`); None when it holds none."""
    import math

    metadata = vet(dist_directory(directory))
    counts = []
    for entry in metadata.state_dict_metadata.values():
        dtype, size = getattr(getattr(entry, "properties", None), "dtype", None), getattr(entry, "size", ())
        if isinstance(dtype, torch.dtype) and all(isinstance(n, int) for n in size):
            counts.append((dtype, math.prod(size)))
    return dtypes.dominant(counts)


def read_tensors(directory: str | Path, meta: dict, plan) -> DistTensors | None:
    """The checkpoint's tensors by spec name, read directly (no model, no megatron-core), every tensor of the plan
    checked to be there with the shape recorded at import; None for a checkpoint that records no shapes (written
    by an earlier version: `load` it into a model)."""
    if "tensor_shapes" not in meta:
        return None
    dist_dir = dist_directory(directory)
    tensors = DistTensors(dist_dir, vet(dist_dir), meta["tensor_shapes"])
    missing = [m for m in plan.mappings if m.mcore not in tensors]
    if missing:
        tensors.__exit__(None, None, None)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"the Megatron checkpoint '{directory}' lacks '{missing[0].mcore}'{more}",
                              key=missing[0].mcore, rule=missing[0].span)
    return tensors


def load(chunks, directory: str | Path) -> None:
    """Fill `chunks` (built at any parallel layout) from the checkpoint, resharding as needed, whether it holds a
    TE or a local layer spec's keys (`te_keys`)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    dist_dir = dist_directory(directory)
    present = set(vet(dist_dir).state_dict_metadata)
    try:
        state = dist_checkpointing.load(_sharded_state_dict(chunks, present=present), str(dist_dir))
    except (CheckpointException, EOFError, AssertionError, AttributeError, KeyError, ValueError, TypeError,
            RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise ConversionError(f"the Megatron checkpoint '{dist_dir}' is damaged or does not fit the model: "
                              f"{type(exc).__name__}: {_first_line(exc) or 'no message'}") from None
    states = [state["model"]] if len(chunks) == 1 else [state[f"model{k}"] for k in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, states):
        result = chunk.load_state_dict(chunk_state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise ConversionError(f"the Megatron checkpoint '{directory}' lacks {missing[:5]}")


def _first_line(exc: BaseException) -> str:
    """The gist of a loader's exception, on one line: the first rank's failure of a CheckpointException, the
    refused global of torch's weights-only unpickler."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) and first else first
        return f"{type(first).__name__}: {_first_line(first) or 'no message'}"
    text = str(exc)
    if "WeightsUnpickler error: " in text:
        text = text.split("WeightsUnpickler error: ", 1)[1].split(". Please use", 1)[0]
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def carried_files(directory: str | Path, meta: dict) -> list[Path]:
    """The carried HF files recorded in `meta`, inside the checkpoint's `hf/` (plain names, no links out)."""
    base = Path(directory) / HF_FILES
    if base.is_symlink():
        raise ConversionError(f"'{base}' is a link: carried HF files are read only from inside the checkpoint")
    return [shard_path(base, name) for name in meta["hf_files"] if (base / name).is_file()]


# ---------------------------------------------------------------- vetting the pickles


def vet(dist_dir: Path):
    """Check every pickle megatron-core's loader would unpickle, with restricted unpicklers: `.metadata`,
    `common.pt` and the byte items of the `*.distcp` files (whose locations must be files of this directory).
    Returns the checkpoint's metadata."""
    metadata = dist_metadata.read(dist_dir / ".metadata")
    _vet_json(dist_dir / "metadata.json")
    common = dist_dir / "common.pt"
    if common.exists():
        _vet_torch(common.read_bytes(), f"'{common}'")
    for index, info in metadata.storage_data.items():
        name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        fqn = getattr(index, "fqn", None)
        if not (isinstance(name, str) and isinstance(fqn, str) and all(isinstance(n, int) and n >= 0
                                                                       for n in (offset, length))):
            raise ConversionError(f"'{dist_dir / '.metadata'}' is damaged: a storage entry is not (file, offset, "
                                  f"length)")
        path = shard_path(dist_dir, name)
        if not path.is_file():
            raise ConversionError(f"'{dist_dir / '.metadata'}' names storage file '{name}', which does not exist")
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"'{path}': transformed (e.g. compressed) storage is not supported")
        if isinstance(metadata.state_dict_metadata.get(fqn), dist_metadata.BytesStorageMetadata):
            with open(path, "rb") as f:
                f.seek(offset)
                _vet_torch(f.read(length), f"item '{fqn}' of '{path}'")
    return metadata


def _vet_json(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"'{path}' is missing or damaged: {exc}") from None
    if not isinstance(config, dict) or config.get("sharded_backend") != "torch_dist":
        raise ConversionError(f"'{path}': only torch_dist checkpoints are read (sharded_backend "
                              f"{config.get('sharded_backend') if isinstance(config, dict) else None!r})")


def _vet_torch(data: bytes, what: str) -> None:
    """torch.load's own restricted (weights_only) unpickler, allowing the argparse Namespace Megatron stores (which
    megatron-core registers as safe itself; registered here too for a process that has not imported it)."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OSError) as exc:
        raise ConversionError(f"refusing {what}: {_first_line(exc) or type(exc).__name__}") from None
