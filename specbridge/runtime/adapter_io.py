"""Adapter I/O: PEFT LoRA adapters <-> the Megatron LoRA model (`runtime.lora`), by the derived adapter plan.

- `settings_from_peft(config, adapter, reader)`: the `LoraSettings` of a PEFT adapter directory, after checking its
  `adapter_config.json` (plain LoRA only: no DoRA, biases, patterns, fan-in-fan-out or extra modules) and that its
  keys are exactly those of the HF linears it adapts. Where the parts of one fused Megatron linear carry different
  `lora_A` matrices, the fused A stacks them and the fused B is block-structured in the base layout (rank = sum of
  the parts' ranks): exact, never averaged.
- `import_adapter(chunks, adapter, settings, reader, topology)`: fills this rank's adapter weights, each TP rank with its
  slices of A and B (the kernels of the base weights: fuse by layout, `ABSENT_PROJECTION` parts filled by their
  policy, TP slices).
- `export_adapter(chunks, adapter, settings, topology, check_absent)`: the PEFT tensors, on every rank. A and B are
  gathered within their TP group to the rank that writes the base weight; that rank splits B by the layout, checks
  the absent parts (on K=V layers V's rows must still equal K's, or be zero, since the model reads V from K;
  otherwise an error naming the layer, unless the user drops them), and undoes a stacking.
- `write_peft(out, tensors, config)`: `adapter_model.safetensors` + `adapter_config.json`.
- `MergingSink`: wraps an HF checkpoint writer so each adapted weight is written as `W + scale * (B @ A)`, computed
  in fp32 and cast back (PEFT's `merge_and_unload`).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import torch

from ..compiler import ir
from ..compiler.adapters import A, B, PEFT_PREFIX, AdapterPlan, AdapterTarget, peft_key
from ..compiler.layouts import infer_sizes, shape_of
from ..errors import ConversionError, UsageError
from . import collectives
from .exporter import gather_tp
from .lora import LoraSettings, adapter_tensors
from .ops import fuse, run_import, split
from .parallel import Topology, current_topology
from .placement import tp_of, writes
from .tp import tp_slice
from .safetensors_io import CheckpointReader, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_UNSUPPORTED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
                "modules_to_save": (None, []),
                "layers_to_transform": (None, []), "layers_pattern": (None, [], ""), "lora_bias": (False, None),
                "megatron_config": (None,), "use_qalora": (False, None),
                "trainable_token_indices": (None,), "alora_invocation_tokens": (None,)}


# ---------------------------------------------------------------- PEFT side


def read_peft(directory: str | Path) -> tuple[dict, CheckpointReader]:
    """The adapter config and a reader of a PEFT adapter directory."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"'{directory}' is not a PEFT adapter directory (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"'{path}' does not hold a JSON object")
    if not (directory / WEIGHTS_NAME).is_file():
        raise UsageError(f"'{directory}' has no {WEIGHTS_NAME} (only safetensors adapters are read)")
    return config, CheckpointReader(directory)


def settings_from_peft(config: dict, adapter: AdapterPlan, reader: CheckpointReader) -> LoraSettings:
    """Check a PEFT LoRA config and its keys against the adapter plan; decide which fused A's stack."""
    if config.get("peft_type") != "LORA":
        raise UsageError(f"only LoRA adapters convert (adapter_config.json has peft_type {config.get('peft_type')!r})")
    if config.get("target_parameters"):
        raise UsageError(f"the PEFT adapter adapts parameters {config['target_parameters']} (routed experts): LoRA "
                         f"on routed experts is not supported; adapt the attention and dense MLP linears only")
    for field, allowed in _UNSUPPORTED.items():
        if field in config and config[field] not in allowed:
            raise UsageError(f"PEFT LoRA option {field}={config[field]!r} is not supported")
    keys = reader.keys()
    hf_targets = tuple(sorted({k.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in keys
                               if k.startswith(PEFT_PREFIX)}))
    linears = tuple(sorted({t.module.rsplit(".", 1)[-1] for t in adapter.targets
                            if any(hf.rsplit(".", 1)[-1] in hf_targets for _, hf in t.hf_modules)}))
    settings = LoraSettings(config.get("r"), config.get("lora_alpha", 8), linears or _all_linears(adapter),
                            bool(config.get("use_rslora", False)), hf_targets, peft_config=config)
    _check_uniform(config, adapter, settings)
    expected = _expected_keys(adapter, settings)
    missing = sorted(expected - keys)
    if missing:
        raise ConversionError(f"the PEFT adapter has no tensor '{missing[0]}'" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), key=missing[0])
    unknown = sorted(keys - expected)
    if unknown:
        raise ConversionError(f"the PEFT adapter has tensor '{unknown[0]}'" +
                              (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "") +
                              f", which adapts no linear the spec '{adapter.base.spec}' maps", key=unknown[0])
    for key in sorted(expected):
        shape = reader.shape(key)
        rank_dim = 0 if ".lora_A." in key else 1
        if len(shape) != 2 or shape[rank_dim] != settings.rank:
            raise ConversionError(f"PEFT tensor '{key}' has shape {list(shape)}, not rank {settings.rank} as "
                                  f"adapter_config.json says", key=key)
    stacked = tuple((t.module, parts) for t in _adapted(adapter, settings) if (parts := _stacking(t, settings, reader)))
    return LoraSettings(settings.rank, settings.alpha, settings.targets, settings.use_rslora, hf_targets, stacked,
                        config)


def _check_uniform(config: dict, adapter: AdapterPlan, settings: LoraSettings) -> None:
    """`rank_pattern` / `alpha_pattern` (PEFT adds some for modules it may adapt) must leave every linear this adapter
    adapts at the config's r and alpha: one scale for the whole model."""
    for field, default in (("rank_pattern", settings.rank), ("alpha_pattern", settings.alpha)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise UsageError(f"PEFT LoRA option {field} must be a mapping, got {patterns!r}")
        for t in _adapted(adapter, settings):
            for _, hf in _adapted_parts(t, settings):
                value = next((v for p, v in patterns.items() if _matches(p, hf)), default)
                if value != default:
                    raise UsageError(f"PEFT LoRA option {field} gives '{hf}' {value}, not {default}: per-module "
                                     f"ranks and alphas are not supported")


def _matches(pattern, module: str) -> bool:
    """PEFT's pattern rule: the pattern matches the module name's tail at a dot boundary."""
    try:
        return re.match(rf"(.*\.)?({pattern})$", module) is not None
    except (re.error, TypeError) as exc:
        raise UsageError(f"PEFT LoRA pattern {pattern!r} is not a valid regular expression: {exc}") from None


def _all_linears(adapter: AdapterPlan) -> tuple[str, ...]:
    return tuple(sorted({t.module.rsplit(".", 1)[-1] for t in adapter.targets}))


def _expected_keys(adapter: AdapterPlan, settings: LoraSettings) -> set[str]:
    return {peft_key(hf, which) for t in _adapted(adapter, settings) for _, hf in _adapted_parts(t, settings)
            for which in (A, B)}


def _adapted(adapter: AdapterPlan, settings: LoraSettings) -> list[AdapterTarget]:
    return [t for t in adapter.targets if t.module.rsplit(".", 1)[-1] in settings.targets]


def _adapted_parts(t: AdapterTarget, settings: LoraSettings) -> list[tuple[str, str]]:
    return [(part, hf) for part, hf in t.hf_modules if settings.adapts(hf)]


def _stacking(t: AdapterTarget, settings: LoraSettings, reader) -> tuple[tuple[str, int], ...]:
    """((part, rank), ...) when the adapted parts of one fused linear have different A matrices, else ()."""
    parts = _adapted_parts(t, settings)
    if len(parts) < 2:
        return ()
    first = reader.get(peft_key(parts[0][1], A))
    if all(torch.equal(first, reader.get(peft_key(hf, A))) for _, hf in parts[1:]):
        return ()
    return tuple((part, settings.rank) for part, _ in parts)


# ---------------------------------------------------------------- import


def import_adapter(chunks, adapter: AdapterPlan, settings: LoraSettings, reader, topology: Topology | None = None) -> int:
    """Fill this rank's adapter weights (built by `lora.apply_lora`). Errors are agreed on by all ranks."""
    topology = topology or current_topology()
    local = adapter_tensors(chunks)
    error, count = None, 0
    try:
        with torch.no_grad():
            for t in _adapted(adapter, settings):
                if t.a.mcore not in local:
                    continue
                a_full, b_full = _fused(t, settings, reader, _base_rows(t, local[t.b.mcore], topology))
                rank, size = tp_of(topology, t.base)
                for mapping, full in ((t.a, a_full), (t.b, b_full)):
                    piece = tp_slice(full, mapping, rank, size)
                    target = local[mapping.mcore]
                    if tuple(piece.shape) != tuple(target.shape):
                        raise ConversionError(f"shape mismatch: the adapter gives {list(piece.shape)} for this rank, "
                                              f"the Megatron LoRA tensor is {list(target.shape)}", key=mapping.mcore,
                                              rule=mapping.span, rank=topology.rank)
                    target.copy_(piece)
                    count += 1
    except ConversionError as exc:
        error = exc.located(rank=topology.rank)
    collectives.agree(error)
    return count


def _base_rows(t: AdapterTarget, local_b: torch.Tensor, topology: Topology) -> int:
    """Rows of the full base weight (= of the full B)."""
    return local_b.shape[0] * (1 if t.parallel != "column" else tp_of(topology, t.base)[1])


def _fused(t: AdapterTarget, settings: LoraSettings, reader, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full Megatron A and B of one target from the PEFT tensors."""
    parts = _adapted_parts(t, settings)
    stacked = dict(settings.stacked).get(t.module)
    a_parts = {part: reader.get(peft_key(hf, A)) for part, hf in parts}
    rank = settings.module_rank(t.module)
    a_full = torch.cat([a_parts[p] for p, _ in stacked]) if stacked else a_parts[parts[0][0]]
    offsets = dict(_offsets(stacked)) if stacked else {}
    b_parts = {}
    for part, hf in t.hf_modules:
        b = reader.get(peft_key(hf, B)) if settings.adapts(hf) else None
        if b is not None and stacked:
            wide = b.new_zeros((b.shape[0], rank))
            wide[:, offsets[part]:offsets[part] + b.shape[1]] = b
            b = wide
        b_parts[part] = b
    dtype = a_full.dtype
    for part, b in b_parts.items():  # a part PEFT does not adapt changes nothing: zero rows
        if b is None:
            b_parts[part] = torch.zeros((_part_rows(t, part, rows, rank), rank), dtype=dtype)
    return a_full, run_import(t.b, b_parts)


def _offsets(stacked) -> list[tuple[str, int]]:
    out, offset = [], 0
    for part, rank in stacked:
        out.append((part, offset))
        offset += rank
    return out


def _part_rows(t: AdapterTarget, part: str, rows: int, rank: int) -> int:
    layout = t.b.layout
    if layout is None or t.b.hf_layout is not None:  # the part is the whole fused HF module
        return rows
    return shape_of(layout, infer_sizes(layout, (rows, rank)), part)[0]


# ---------------------------------------------------------------- export


def export_adapter(chunks, adapter: AdapterPlan, settings: LoraSettings, topology: Topology | None = None,
                   check_absent: bool = True) -> dict[str, torch.Tensor]:
    """The PEFT adapter tensors (`base_model.model.<module>.lora_A/B.weight`), on every rank."""
    topology = topology or current_topology()
    local = adapter_tensors(chunks)
    out, error = {}, None
    with torch.no_grad():
        for t in _adapted(adapter, settings):
            if t.a.mcore not in local:
                continue
            a_full = gather_tp(local[t.a.mcore].detach(), t.a, topology, None)
            b_full = gather_tp(local[t.b.mcore].detach(), t.b, topology, None)
            if a_full is None or error is not None or not writes(topology, t.base):
                continue
            try:
                out.update(_peft_tensors(t, settings, a_full, b_full, check_absent))
            except ConversionError as exc:
                error = exc.located(rank=topology.rank)
    collectives.agree(error)
    merged = {}
    for part in collectives.gather_objects(out):
        merged.update(part)
    return dict(sorted(merged.items()))


def _peft_tensors(t: AdapterTarget, settings: LoraSettings, a_full, b_full, check_absent: bool) -> dict:
    b_parts = split(t.b.layout, b_full) if t.b.layout is not None else {t.b.sources[0].part: b_full}
    for op in t.b.mcore_to_hf:
        if isinstance(op, ir.CheckAbsent):
            if check_absent:
                _check_absent_rows(t, op, b_parts)
            del b_parts[op.part]
    if t.b.hf_layout is not None:  # one fused HF module (Phi-3's qkv_proj): its parts joined back
        b_parts = {t.b.sources[0].part: fuse(t.b.hf_layout, b_parts)}
    stacked = dict(settings.stacked).get(t.module)
    offsets = dict(_offsets(stacked)) if stacked else {}
    ranks_of = dict(stacked) if stacked else {}
    out = {}
    for part, hf in t.hf_modules:
        b = b_parts[part]
        if not settings.adapts(hf):
            _require_zero(b, f"B rows of part '{part}' of '{t.module}'{_layer(t)} are non-zero, but the PEFT adapter "
                             f"has no adapter on '{hf}' (its target_modules)", t)
            continue
        if stacked:
            lo, hi = offsets[part], offsets[part] + ranks_of[part]
            outside = torch.cat([b[:, :lo], b[:, hi:]], dim=1)
            _require_zero(outside, f"'{t.module}'{_layer(t)} fuses differing PEFT A matrices, and B is no longer "
                                   f"block-structured (part '{part}' uses another part's rank columns); it cannot "
                                   f"be split back into PEFT adapters", t)
            a, b = a_full[lo:hi], b[:, lo:hi]
        else:
            a = a_full
        out[peft_key(hf, A)] = a.contiguous().clone()
        out[peft_key(hf, B)] = b.contiguous().clone()
    return out


def _layer(t: AdapterTarget) -> str:
    return f" in layer {t.base.layer}" if t.base.layer is not None else ""


def _require_zero(tensor, message: str, t: AdapterTarget) -> None:
    if tensor.numel() and torch.count_nonzero(tensor):
        raise ConversionError(message, key=t.b.mcore, rule=t.base.span)


def _check_absent_rows(t: AdapterTarget, op: ir.CheckAbsent, parts: dict) -> None:
    """V's rows of a K=V layer play no part: they equal K's (where the model reads V from K) or are zero."""
    value = parts[op.part]
    if not torch.count_nonzero(value):
        return
    if op.policy == "copy_of" and torch.equal(value, parts[op.source_part]):
        return
    expected = parts[op.source_part] if op.policy == "copy_of" else torch.zeros_like(value)
    diff = (value.float() - expected.float()).abs().max().item()
    what = f"a copy of part '{op.source_part}' or zero" if op.policy == "copy_of" else "zero"
    raise ConversionError(
        f"adapter rows of part '{op.part}' of '{t.module}'{_layer(t)} are ABSENT_PROJECTION on the HF side and must "
        f"be {what}, but they diverged (max |difference| {diff:.6g}); PEFT cannot represent them. Export with the "
        f"policy 'drop' (--absent drop) to drop them", key=t.b.mcore, rule=op.span)


# ---------------------------------------------------------------- files


def peft_config(settings: LoraSettings, adapter: AdapterPlan, base_model: str | None, hf_config=None) -> dict:
    """adapter_config.json: the PEFT config the adapter came from (base model updated), or a plain LoRA config whose
    `target_modules` name exactly the adapted HF linears (by last name when that names no other module of the HF
    model, e.g. a vision tower's, else by full name)."""
    if settings.peft_config is not None:
        return {**settings.peft_config,
                "base_model_name_or_path": base_model or settings.peft_config.get("base_model_name_or_path")}
    modules = sorted({hf for t in _adapted(adapter, settings) for _, hf in _adapted_parts(t, settings)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.rank, "lora_alpha": settings.alpha, "use_rslora": settings.use_rslora,
            "target_modules": _target_modules(modules, adapter.base.architecture, hf_config), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}


def _target_modules(modules: list[str], architecture: str, hf_config) -> list[str]:
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if hf_config is None:
        return short
    from .manifests import hf_model_class

    with torch.device("meta"):
        model = hf_model_class(architecture)(hf_config)
    named = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return short if named == set(modules) else modules


def write_peft(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict, overwrite: bool = False) -> Path:
    """Write a PEFT adapter directory atomically (rank 0 writes; every rank takes part in the staging)."""
    with collectives.staged_output(out_dir, overwrite) as staging:
        if collectives.world()[0] == 0:
            write_safetensors(staging / WEIGHTS_NAME, tensors, {"format": "pt"})
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


# ---------------------------------------------------------------- merge


def deltas(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF base weight key -> (A, B) of its adapter."""
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return out


class MergingSink:
    """An HF checkpoint writer that writes each adapted weight as `W + scale * (B @ A)` (fp32, cast back)."""

    def __init__(self, sink, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float):
        self.sink, self.updates, self.scale = sink, updates, scale
        self.merged: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor, owned: bool = False) -> None:
        if key in self.updates:
            a, b = self.updates[key]
            tensor = (tensor.float() + (b.float() @ a.float()) * self.scale).to(tensor.dtype)
            owned = True
            self.merged.add(key)
        self.sink.add(key, tensor, owned=owned)

    def __getattr__(self, name):
        return getattr(self.sink, name)


# ---------------------------------------------------------------- new adapters and manifests


def init_adapter(chunks, adapter: AdapterPlan, settings: LoraSettings, topology: Topology | None = None, seed: int = 0) -> None:
    """Fresh adapters: B zero, A uniform in +-1/sqrt(in) (nn.Linear's default), drawn for the full matrix from a
    generator seeded by the module's name, so every TP rank holds its slice of the same A at any TP size."""
    topology = topology or current_topology()
    local = adapter_tensors(chunks)
    with torch.no_grad():
        for t in _adapted(adapter, settings):
            if t.a.mcore not in local:
                continue
            rank, size = tp_of(topology, t.base)
            shape = list(local[t.a.mcore].shape)
            shape[1] *= size if t.parallel == "row" else 1
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.module.encode()))
            bound = 1.0 / math.sqrt(shape[1])
            full = torch.empty(shape).uniform_(-bound, bound, generator=gen)
            local[t.a.mcore].copy_(tp_slice(full, t.a, rank, size))
            local[t.b.mcore].zero_()


def hf_adapter_manifest(architecture: str, hf_config, adapter: AdapterPlan, rank: int = 8) -> ir.Manifest:
    """PEFT's adapter keys for the plan's HF linears: `get_peft_model` on the meta-device transformers model."""
    from .manifests import hf_model_class

    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    except ImportError as exc:  # peft is needed only for this proof
        raise UsageError("proving an adapter plan against PEFT needs the 'peft' package") from exc
    cls = hf_model_class(architecture)
    with torch.device("meta"):
        model = cls(hf_config)
    modules = sorted({hf for t in adapter.targets for _, hf in t.hf_modules})
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=modules))
    state = get_peft_model_state_dict(peft_model)
    return ir.Manifest(ir.HF, f"peft LoRA on transformers {architecture} (meta device)",
                       tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()))


def mcore_adapter_manifest(chunks, model_name: str) -> ir.Manifest:
    """The Megatron LoRA model's adapter parameters."""
    tensors = tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                    for k, v in adapter_tensors(chunks).items())
    return ir.Manifest(ir.MCORE, f"the megatron-core '{model_name}' model with LoRA adapters", tensors)
