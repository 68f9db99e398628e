"""The programmatic API: one `Converter` per (spec, HF config, architecture, format).

    conv = Converter.from_pretrained("path/to/hf_checkpoint")   # spec picked from config.json
    conv.check()                                                # coverage proof against both manifests
    chunks = conv.build_model()                                 # this rank's megatron-core model chunk(s)
    conv.import_weights(chunks, "path/to/hf_checkpoint")
    conv.export_weights(chunks, "out/hf")                       # safetensors + config.json, atomically
    for bucket in conv.iter_hf_weights(chunks):                 # or in memory: [(HF name, tensor), ...]
        engine.load_weights(bucket)

Parallel state must be initialised first (`specbridge.runtime.parallel.init_parallel`, a single-process world
when not under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import compiler
from .compiler import ir
from .errors import ConversionError, SpecError, UsageError
from .runtime import collectives, exporter, importer, manifests
from .runtime.placement import Ranks
from .runtime.build import build_chunks
from .runtime.safetensors_io import CheckpointReader, CheckpointWriter, finalize
from .spec_files import SPEC_DIR, builtin_specs, resolve_spec_path, spec_for_architecture  # noqa: F401


def load_hf_config(source):
    """An HF config from a checkpoint directory, a config.json path, or a config object."""
    if not isinstance(source, (str, Path)):
        return source
    from transformers import AutoConfig

    path = Path(source)
    directory = path.parent if path.is_file() else path
    if not (directory / "config.json").is_file():
        raise UsageError(f"'{path}' does not exist or has no config.json")
    return AutoConfig.from_pretrained(str(directory))


@dataclasses.dataclass
class Converter:
    spec_path: Path
    hf_config: object
    plan: ir.Plan

    @classmethod
    def from_config(cls, hf_config, spec=None, architecture: str | None = None, fmt: str | None = None):
        if spec is not None:
            compiler.load(resolve_spec_path(spec, architecture))  # spec errors first, before any file is read
        hf_config = load_hf_config(hf_config)
        architecture = architecture or next(iter(getattr(hf_config, "architectures", None) or []), None)
        path = resolve_spec_path(spec, architecture)
        plan = compiler.compile_plan(compiler.load(path), hf_config, architecture, fmt)
        return cls(path, hf_config, plan)

    @classmethod
    def from_pretrained(cls, hf_dir, spec=None, architecture: str | None = None, fmt: str | None = None):
        """For an HF checkpoint directory; the on-disk format is detected from the keys when not given."""
        hf_config = load_hf_config(hf_dir)
        conv = cls.from_config(hf_config, spec, architecture, fmt)
        if fmt is None:
            conv = conv.with_format(detect_format(conv, CheckpointReader(hf_dir).keys()))
        return conv

    def with_format(self, fmt: str) -> "Converter":
        if fmt == self.plan.format:
            return self
        return Converter.from_config(self.hf_config, self.spec_path, self.plan.architecture, fmt)

    @property
    def spec(self):
        return compiler.load(self.spec_path)

    @property
    def text_config(self):
        from .compiler.resolve import select_architecture, text_config

        return text_config(self.hf_config, select_architecture(self.spec, self.hf_config, self.plan.architecture))

    # ------------------------------------------------------------ proofs
    def manifests(self, chunks=None) -> tuple[ir.Manifest, ir.Manifest]:
        hf = manifests.hf_manifest(self.plan.architecture, self.hf_config, self.plan.format, self.spec.formats)
        chunks = chunks if chunks is not None else self.build_model()
        return hf, manifests.mcore_manifest(chunks, self.plan.model)

    def check(self, chunks=None) -> ir.Plan:
        """Prove coverage, uniqueness and shapes against both manifests (a `SpecError` otherwise)."""
        spec = self.spec
        return compiler.check(self.plan, *self.manifests(chunks), sources={spec.file: spec.source})

    # ------------------------------------------------------------ models and weights
    def build_model(self, params_dtype=None, extra_transformer: dict | None = None) -> list:
        """This rank's model chunk(s); `extra_transformer` adds TransformerConfig fields the spec does not set
        (e.g. `num_layers_in_first_pipeline_stage` for an uneven pipeline split)."""
        return build_chunks(self.plan, self.text_config, params_dtype, extra_transformer)

    def import_weights(self, chunks, hf_dir, ranks: Ranks | None = None, progress=None) -> CheckpointReader:
        reader = CheckpointReader(hf_dir)
        importer.import_weights(chunks, self.plan, reader, ranks or Ranks.current(), progress=progress)
        return reader

    def export_weights(self, chunks, out_dir, dtype: torch.dtype | None = None, check_absent: bool = True,
                       max_shard_bytes: int = 2 << 30, overwrite: bool = False, progress=None) -> Path:
        """Write an HF checkpoint (safetensors + config.json), from all ranks at once when distributed: each
        writing rank writes its own shard files, rank 0 the index and config; all into one staging directory
        that becomes `out_dir` only when every rank succeeded."""
        dtype = dtype or config_dtype(self.hf_config)
        ranks = Ranks.current()
        with collectives.staged_output(out_dir, overwrite) as staging:
            writer = CheckpointWriter(staging, max_shard_bytes, shard_prefix=f"rank{ranks.rank:05d}")
            exporter.export_weights(chunks, self.plan, writer, ranks, hf_dtype=dtype, check_absent=check_absent,
                                    progress=progress)
            maps = collectives.gather_objects((writer.finish(), writer.total_bytes))
            if ranks.rank == 0:
                weight_map = {k: f for m, _ in maps for k, f in m.items()}
                finalize(staging, weight_map, sum(total for _, total in maps))
                write_hf_config(self, chunks, staging, dtype)
        return Path(out_dir)

    def iter_hf_weights(self, chunks, bucket_bytes: int = 512 << 20, dtype: torch.dtype | None = None,
                        check_absent: bool = True):
        """HF-named tensors of the model, without touching disk, as lists of `(name, tensor)` of at most
        `bucket_bytes` each (a larger single tensor comes alone): exactly what `export_weights` would write, each
        tensor on the rank that would write it. Every rank must consume the generator to the end."""
        from .runtime.weight_stream import iter_hf_weights

        return iter_hf_weights(chunks, self.plan, Ranks.current(), bucket_bytes,
                               dtype or config_dtype(self.hf_config), check_absent)


def config_dtype(hf_config) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        return getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def detect_format(conv: Converter, keys: set[str]) -> str:
    """The spec format whose HF keys are exactly the checkpoint's (sentinel keys optional)."""
    formats = conv.spec.formats
    if len(formats) == 1:
        return formats[0]
    for fmt in formats:
        plan = conv.with_format(fmt).plan
        if plan.hf_keys() <= keys:
            return fmt
    raise ConversionError(f"the checkpoint's keys match none of the formats {list(formats)} of spec "
                          f"'{conv.plan.spec}'")


def hf_config_from_mcore(conv: Converter, transformer_config) -> dict:
    """The HF config dict for export: the source config with every invertible field written back from the
    Megatron model's own config (the config mapping run backwards)."""
    full = conv.hf_config.to_dict()
    arch = next(a for a in conv.spec.architectures if a.name == conv.plan.architecture)
    target = full[arch.config] if arch.config and isinstance(full.get(arch.config), dict) else full
    for entry in conv.plan.config:
        if entry.hf_path is None or entry.section != "transformer":
            continue
        value = getattr(transformer_config, entry.field, entry.value)
        if isinstance(entry.value, (bool, int, float, str)) and not callable(value):
            _set_path(target, entry.hf_path, value)
    full["architectures"] = [conv.plan.architecture]
    return full


def _set_path(target: dict, path: str, value) -> None:
    *heads, last = path.split(".")
    for head in heads:
        target = target.setdefault(head, {})
    target[last] = value


def write_hf_config(conv: Converter, chunks, directory: Path, dtype) -> None:
    config = hf_config_from_mcore(conv, chunks[0].config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["Converter", "SpecError", "ConversionError", "builtin_specs", "detect_format"]
