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

import contextlib
import dataclasses
import functools
import json
import shutil
import types
from collections.abc import Mapping
from pathlib import Path

import torch

from . import compiler
from .compiler import adapters, ir
from .compiler.invert import invert_config
from .errors import ConversionError, SpecError, UsageError
from .inputs import builtin_specs, hf_config_file, spec_path
from .runtime import adapter_io, collectives, direct_write, dtypes, exporter, importer, lora, manifests
from .runtime.lora import LoraSettings
from .runtime.dist_tensors import DistTensors
from .runtime.parallel import Topology, current_topology
from .runtime.placement import checkpoint_share
from .runtime.build import build_chunks
from .runtime.safetensors_io import CheckpointReader, CheckpointWriter, finalize



def spec_for_architecture(architecture: str) -> Path:
    """The built-in spec serving `architecture`. Only specs that name it, or could inherit it through `extends`,
    are parsed, those naming it first: parsing every built-in spec would cost a start-up ~0.4 s."""
    texts = {path: path.read_text() for path in builtin_specs().values()}
    naming = [path for path, text in texts.items() if architecture in text]
    inheriting = [path for path, text in texts.items() if architecture not in text and "extends" in text]
    for path in naming + inheriting:
        if any(a.name == architecture for a in compiler.load(path).architectures):
            return path
    raise UsageError(f"no built-in spec serves architecture '{architecture}' "
                     f"(built-in specs: {', '.join(builtin_specs())}); pass --spec")


def resolve_spec_path(spec: str | Path | None, architecture: str | None) -> Path:
    if spec is None:
        if architecture is None:
            raise UsageError("config.json names no architecture; pass --spec")
        return spec_for_architecture(architecture)
    return spec_path(spec)


def load_hf_config(source):
    """An HF config from a checkpoint directory, a config.json path, or a config object."""
    if not isinstance(source, (str, Path)):
        return source
    return hf_config_from_dict(read_config_json(source))


def read_config_json(source: str | Path) -> dict:
    """The `config.json` of a checkpoint directory (or that file itself), as written."""
    file = hf_config_file(source)
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"'{file}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"'{file}' is not a JSON object")
    return config


def hf_config_from_dict(config: dict):
    """transformers' config object for a config.json dict (its `model_type` picks the class)."""
    from huggingface_hub.errors import StrictDataclassError

    AutoConfig = _auto_config()
    try:
        return AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as exc:
        raise UsageError(f"the HF config (model_type {config.get('model_type')!r}) does not load: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None


def _auto_config():
    """transformers' `AutoConfig`, imported without scanning transformers' models directory twice: `import
    transformers` scans it (every model's files, for the names they export: ~0.6 s here) for its lazy module, and
    importing `transformers.models` scans it again for its own, because the scan's cache (128 entries) is smaller
    than the ~560 folders. The second scan's answer is the first one's without its `models.` prefix (transformers'
    own, still cached), so it is given that while `transformers.models` is imported; anything unexpected (another
    transformers version) takes the plain import."""
    import sys

    import transformers

    if "transformers.models" not in sys.modules:
        from transformers.utils import import_utils

        scan, models = getattr(import_utils, "define_import_structure", None), Path(transformers.__file__).parent / "models"
        if callable(scan) and hasattr(scan, "cache_info"):
            def known(module_path, prefix=None):
                if prefix is not None or Path(module_path) != models / "__init__.py":
                    return scan(module_path, prefix)
                return {backends: {name.removeprefix("models."): set(objects) for name, objects in modules.items()
                                   if name.startswith("models.")}
                        for backends, modules in scan(models, prefix="models").items()}

            import_utils.define_import_structure = known
            try:
                import transformers.models  # noqa: F401 - its lazy module, built from the answer above
            finally:
                import_utils.define_import_structure = scan
    from transformers import AutoConfig

    return AutoConfig


def portable_config(hf_config) -> dict:
    """The config as a plain dict, without what names the machine (`_name_or_path`)."""
    return {k: v for k, v in hf_config.to_dict().items() if k != "_name_or_path"}


@dataclasses.dataclass
class Converter:
    """`source_config` is the source's `config.json` as written (an export writes it back with only what the
    conversion changed); `source_dtype` the one dtype of the source checkpoint's tensors (the default parameter
    dtype of `build_model`)."""

    spec_path: Path
    hf_config: object
    plan: ir.Plan
    source_config: dict | None = None
    source_dtype: torch.dtype | None = None

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
        if spec is not None:
            compiler.load(resolve_spec_path(spec, architecture))  # spec errors first, before any file is read
        source_config = read_config_json(hf_dir)
        conv = cls.from_config(hf_config_from_dict(source_config), spec, architecture, fmt)
        reader = CheckpointReader(hf_dir)
        conv = dataclasses.replace(conv, source_config=source_config, source_dtype=dtypes.uniform(reader))
        return conv.with_format(detect_format(conv, reader.keys())) if fmt is None else conv

    def with_format(self, fmt: str) -> "Converter":
        if fmt == self.plan.format:
            return self
        other = Converter.from_config(self.hf_config, self.spec_path, self.plan.architecture, fmt)
        return dataclasses.replace(self, plan=other.plan)

    @property
    def spec(self):
        return compiler.load(self.spec_path)

    @property
    def text_config(self):
        from .compiler.resolve import select_architecture, text_config

        return text_config(self.hf_config, select_architecture(self.spec, self.hf_config, self.plan.architecture))

    # ------------------------------------------------------------ proofs
    def manifests(self, chunks=None) -> tuple[ir.Manifest, ir.Manifest]:
        """Both sides' (key, shape, dtype). Without `chunks`, the Megatron model is built on the meta device:
        shapes only, no memory, at any size (the HF model is always instantiated on meta)."""
        hf = manifests.hf_manifest(self.plan.architecture, self.hf_config, self.plan.format, self.spec.formats)
        chunks = chunks if chunks is not None else self.build_model(device="meta")
        return hf, manifests.mcore_manifest(chunks, self.plan.model)

    def check(self, chunks=None, manifests: tuple[ir.Manifest, ir.Manifest] | None = None) -> ir.Plan:
        """Prove coverage, uniqueness and shapes against both manifests (a `SpecError` otherwise)."""
        spec = self.spec
        return compiler.check(self.plan, *(manifests or self.manifests(chunks)), sources=spec.texts)

    def expanded_plan(self) -> ir.Plan:
        """The plan with its subtree rules expanded to one mapping per tensor of the HF model class (every rank
        the same, so collectives stay in step)."""
        if not self.plan.subtrees:
            return self.plan
        hf = manifests.hf_manifest(self.plan.architecture, self.hf_config, self.plan.format, self.spec.formats)
        return ir.expand_subtrees(self.plan, hf.shapes())

    # ------------------------------------------------------------ models and weights
    def build_model(self, params_dtype=None, extra_transformer: dict | None = None, device=None,
                    padded_vocab: int | None = None) -> list:
        """This rank's model chunk(s), with parameters of `params_dtype` (default: the source checkpoint's dtype,
        fp32 when unknown); `extra_transformer` adds TransformerConfig fields the spec does not set (e.g.
        `num_layers_in_first_pipeline_stage` for a pipeline split of one's own). `device="meta"`: parameters
        without storage (what a manifest needs). `padded_vocab`: the padded vocabulary a Megatron checkpoint was
        written with (default: padded as Megatron pads it for this TP size). Builders get the whole HF config."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return build_chunks(self.plan, self.hf_config, params_dtype or self.source_dtype, extra_transformer,
                                padded_vocab)

    def megatron_config(self, params_dtype=None, extra_transformer: dict | None = None):
        """(megatron-core `TransformerConfig`, `GPTModel` keyword arguments) of this model at the current parallel
        layout, for building the model oneself with megatron-core's own spec functions (local or TransformerEngine
        layer spec, grouped experts or not); `import_weights` and `export_weights` take such a model as they take
        `build_model`'s. Random initialisation is off (`perform_initialization`): the import fills every tensor."""
        from .runtime import cpu_compat
        from .runtime.build import model_fields
        from .runtime.models.gpt import transformer_config

        if self.plan.model != "gpt":
            raise UsageError(f"spec '{self.plan.spec}' builds megatron model '{self.plan.model}', not megatron-core's "
                             f"GPTModel: use build_model()")
        cpu_compat.apply()
        transformer, model = model_fields(self.plan, params_dtype or self.source_dtype, extra_transformer)
        return transformer_config(transformer), model

    def import_weights(self, chunks, hf_dir, topology: Topology | None = None, progress=None,
                       cast: bool = False) -> CheckpointReader:
        """Fill `chunks` from the HF checkpoint. A tensor whose dtype differs from its parameter's is converted
        only when that keeps its values (bf16 -> fp32) or with `cast=True` (see `dtypes.import_casts`)."""
        reader = CheckpointReader(hf_dir)
        plan = ir.expand_subtrees(self.plan, reader.keys())
        if not cast:
            dtypes.refuse_inexact(dtypes.import_casts(plan, reader, chunks[0].config.params_dtype))
        importer.import_weights(chunks, plan, reader, topology or current_topology(), progress=progress)
        return reader

    def export_weights(self, chunks, out_dir, dtype: torch.dtype | None = None, check_absent: bool = True,
                       max_shard_bytes: int = 2 << 30, overwrite: bool = False, progress=None, carry=(),
                       inputs=(), wrap_sink=None) -> Path:
        """Write an HF checkpoint (safetensors + config.json, and copies of the `carry` files) from the model
        `chunks`, or from a Megatron checkpoint's tensors read directly (`mcore_checkpoint.open_tensors`; every
        rank writes the tensors of its `share`). From all ranks at once when distributed: from a model, each rank
        writes its own slices of the tensors that only need placing straight into shared shard files
        (`direct_write`), the rest is gathered to one writing rank per tensor, which writes shard files of its
        own; rank 0 writes the index and config; all
        into one staging directory that becomes `out_dir` only when every rank succeeded. Tensors keep the
        model's dtype unless `dtype` is given (a config's `dtype` never changes them). `overwrite` replaces an
        earlier output of specbridge, never the `inputs` (see `collectives.check_output`). `wrap_sink(writer)`
        may wrap the shard writer (the adapter merge does)."""
        plan = self.expanded_plan()
        in_place = wrap_sink is None and not isinstance(chunks, DistTensors)  # from a model: slices written in place
        if isinstance(chunks, DistTensors):  # every rank reads what it writes: no model, no collective
            topology = Topology(*collectives.world())
            dtype = dtype or chunks.dtype
            chunks = chunks.only(checkpoint_share(exporter.export_groups(plan), chunks.nbytes, *collectives.world()))
        else:
            topology = current_topology()
            dtype = dtype or chunks[0].config.params_dtype
        with collectives.staged_output(out_dir, overwrite, inputs) as staging:
            placed = {}, 0
            if in_place and topology.world_size > 1:
                plan, *placed = direct_write.export_placed(chunks, plan, staging, topology, dtype, max_shard_bytes,
                                                           check_absent, progress)
            writer = CheckpointWriter(staging, max_shard_bytes, shard_prefix=f"rank{topology.rank:05d}")
            sink = wrap_sink(writer) if wrap_sink is not None else writer
            exporter.export_weights(chunks, plan, sink, topology, hf_dtype=dtype, check_absent=check_absent,
                                    progress=progress)
            maps = collectives.gather_objects((writer.finish(), writer.total_bytes)) + [tuple(placed)]
            if topology.rank == 0:
                weight_map = {k: f for m, _ in maps for k, f in m.items()}
                finalize(staging, weight_map, sum(total for _, total in maps))
                write_hf_config(self, chunks, staging, dtype)
                for path in carry:
                    shutil.copyfile(path, staging / Path(path).name)
        return Path(out_dir)

    def iter_hf_weights(self, chunks, bucket_bytes: int = 512 << 20, dtype: torch.dtype | None = None,
                        check_absent: bool = True):
        """HF-named tensors of the model, without touching disk, as lists of `(name, tensor)` of at most
        `bucket_bytes` each (a larger single tensor comes alone): exactly what `export_weights` would write, each
        tensor on the rank that would write it. Every rank must consume the generator to the end."""
        from .runtime.weight_stream import iter_hf_weights

        return iter_hf_weights(chunks, self.expanded_plan(), current_topology(), bucket_bytes,
                               dtype or chunks[0].config.params_dtype, check_absent)

    # ------------------------------------------------------------ LoRA adapters (derived from the base plan)
    @functools.cached_property
    def adapter_plan(self) -> adapters.AdapterPlan:
        spec = self.spec
        return adapters.derive(self.plan, sources=spec.texts)

    def add_adapter(self, chunks, rank: int, alpha: float | None = None, targets=adapters.TARGETS,
                    use_rslora: bool = False, seed: int = 0) -> LoraSettings:
        """Fresh LoRA adapters on `targets` (Megatron linear names): B zero, A random (the same on every rank)."""
        settings = LoraSettings(rank, rank if alpha is None else alpha, tuple(targets), use_rslora)
        return self.restore_adapter(chunks, settings, init_seed=seed)

    def restore_adapter(self, chunks, settings: LoraSettings, init_seed: int | None = None) -> LoraSettings:
        """The LoRA modules of `settings` on `chunks` (before a Megatron checkpoint holding them is loaded)."""
        lora.apply_lora(chunks, self.adapter_plan, settings)
        if init_seed is not None:
            adapter_io.init_adapter(chunks, self.adapter_plan, settings, current_topology(), init_seed)
        return settings

    def import_adapter(self, chunks, peft_dir) -> LoraSettings:
        """Add a PEFT LoRA adapter to `chunks` (base weights already imported): its settings."""
        config, reader = adapter_io.read_peft(peft_dir)
        settings = adapter_io.settings_from_peft(config, self.adapter_plan, reader)
        self.restore_adapter(chunks, settings)
        adapter_io.import_adapter(chunks, self.adapter_plan, settings, reader, current_topology())
        return settings

    def adapter_tensors(self, chunks, settings: LoraSettings, check_absent: bool = True) -> dict:
        """The PEFT adapter tensors of `chunks` (on every rank)."""
        return adapter_io.export_adapter(chunks, self.adapter_plan, settings, current_topology(), check_absent)

    def export_adapter(self, chunks, out_dir, settings: LoraSettings, check_absent: bool = True,
                       overwrite: bool = False, base_model: str | None = None) -> Path:
        """Write the PEFT adapter (adapter_model.safetensors + adapter_config.json naming the base model)."""
        tensors = self.adapter_tensors(chunks, settings, check_absent)
        base = base_model or getattr(self.hf_config, "_name_or_path", None) or None
        config = adapter_io.peft_config(settings, self.adapter_plan, base, self.hf_config)
        return adapter_io.write_peft(out_dir, tensors, config, overwrite)

    def export_merged(self, chunks, out_dir, settings: LoraSettings, check_absent: bool = True, **export) -> Path:
        """Write a full HF checkpoint with the adapter merged: W + scale * (B @ A), in fp32, cast back; `export`
        takes `export_weights`' other arguments (dtype, overwrite, progress, carry, inputs)."""
        updates = adapter_io.deltas(self.adapter_tensors(chunks, settings, check_absent))
        return self.export_weights(chunks, out_dir, check_absent=check_absent,
                                   wrap_sink=lambda w: adapter_io.MergingSink(w, updates, settings.scale), **export)

    def check_adapter(self, chunks, rank: int = 8) -> adapters.AdapterPlan:
        """Prove the derived adapter plan against PEFT's adapter keys (meta device) and `chunks`' adapters."""
        spec = self.spec
        hf = adapter_io.hf_adapter_manifest(self.plan.architecture, self.hf_config, self.adapter_plan, rank)
        mcore = adapter_io.mcore_adapter_manifest(chunks, self.plan.model)
        adapters.prove(self.adapter_plan, hf, mcore, sources=spec.texts)
        return self.adapter_plan


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
    missing = {}
    for fmt in formats:
        plan = conv.with_format(fmt).plan
        if plan.hf_keys() <= keys:
            return fmt
        missing[fmt] = sorted(plan.hf_keys() - keys)
    closest = min(formats, key=lambda f: len(missing[f]))
    lacks = missing[closest]
    more = f" and {len(lacks) - 1} more" if len(lacks) > 1 else ""
    raise ConversionError(f"the checkpoint's keys match none of the formats {list(formats)} of spec "
                          f"'{conv.plan.spec}': the closest, '{closest}', needs '{lacks[0]}'{more}, which the "
                          f"checkpoint lacks", key=lacks[0])


def hf_config_from_mcore(conv: Converter, transformer_config) -> dict:
    """The HF config dict for export: the source config with every invertible field written back from the
    Megatron model's own config (`compiler.invert.invert_config`: the config mapping run backwards)."""
    arch = next(a for a in conv.spec.architectures if a.name == conv.plan.architecture)
    return invert_config(conv.plan, conv.hf_config.to_dict(), arch.config, transformer_config)


def _as_source(written, source, defaults, aliases=None):
    """`written` restricted to the keys of `source`, plus the keys it adds whose value is not transformers' default
    (recursively through nested configs); a key written under an alias (`attribute_map`) lands on its real name."""
    if not isinstance(written, dict) or not isinstance(source, dict):
        return written
    defaults = defaults if isinstance(defaults, dict) else {}
    out = {k: _as_source(written[k], v, defaults.get(k)) if k in written else v for k, v in source.items()}
    for key, value in written.items():
        real = (aliases or {}).get(key, key)
        if real != key and real in source:
            out[real] = value
        elif key not in source and value != defaults.get(key):
            out[key] = value
    return out


def write_hf_config(conv: Converter, chunks, directory: Path, dtype) -> None:
    """config.json: the source's as written, with only what the conversion changed (the fields written back from
    the Megatron config, the dtype of the tensors)."""
    # a checkpoint read directly was written from a model of this plan: the plan's Megatron config is its own
    megatron = types.SimpleNamespace(**conv.plan.transformer_kwargs()) if isinstance(chunks, Mapping) else \
        chunks[0].config
    config = hf_config_from_mcore(conv, megatron)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    if conv.source_config is not None:
        config = _as_source(config, conv.source_config, conv.hf_config.to_dict(),
                            getattr(conv.hf_config, "attribute_map", None))
        if "torch_dtype" in config and "dtype" in config:
            config["torch_dtype"] = config["dtype"]
    config.pop("_name_or_path", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["Converter", "SpecError", "ConversionError", "builtin_specs", "detect_format"]
