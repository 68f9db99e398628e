"""LoRA on megatron-core's parallel linears (megatron-core has no LoRA module of its own).

`apply_lora(chunks, adapter, settings)` gives every adapted linear of this rank's model chunks an `adapter`
submodule with two weights named as Megatron-Bridge's LoRA names them, so adapters trained there convert too:

    <linear>.adapter.linear_in.weight    A  [rank, in]     column-parallel: replicated; row-parallel: split like
                                                            the base weight's columns ([rank, in / TP])
    <linear>.adapter.linear_out.weight   B  [out, rank]    column-parallel: split like the base weight's rows
                                                            ([out / TP, rank]); row-parallel: replicated

and adds `scale * B(A(x))` to the linear's output (PEFT's `lora_B(lora_A(x)) * scaling`, scaling `alpha / r`, or
`alpha / sqrt(r)` with rsLoRA). A row-parallel adapter's `A(x)` is a partial sum over the TP ranks' input slices and
is all-reduced before B, as the base output is. The base weight keeps its name and sharding; the adapter weights
enter megatron-core's distributed checkpoint with their own TP axes (the GLU fc1's B with the base weight's
`[gate_r; up_r]` resharding), so a checkpoint written at one TP loads at another.
"""

from __future__ import annotations

import dataclasses
import math
import types

import torch

from ..compiler.adapters import TARGETS, AdapterPlan
from ..errors import ConversionError, UsageError
from .naming import local_to_global, named_tensors


@dataclasses.dataclass(frozen=True, slots=True)
class LoraSettings:
    """What the Megatron LoRA model needs besides the plan: rank, alpha, the adapted Megatron linears
    (`targets`), the HF linears PEFT adapts (`hf_targets`, by last name; empty: every part of the adapted
    linears), and the modules whose fused A stacks differing HF A matrices (`stacked`: module -> ((part, rank),
    ...)). Recorded in the Megatron checkpoint's metadata (`to_json` / `from_json`); `peft_config` is the PEFT
    `adapter_config.json` the adapter came from, if any (written back on export)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    use_rslora: bool = False
    hf_targets: tuple[str, ...] = ()
    stacked: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    peft_config: dict | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UsageError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise UsageError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise UsageError(f"LoRA targets must be some of {list(TARGETS)}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r (alpha / sqrt(r) with rsLoRA), the same for every part of a stacked A."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def adapts(self, hf_module: str) -> bool:
        """Whether PEFT's side has an adapter on this HF linear."""
        return not self.hf_targets or hf_module.rsplit(".", 1)[-1] in self.hf_targets

    def module_rank(self, module: str) -> int:
        stacked = dict(self.stacked).get(module)
        return sum(r for _, r in stacked) if stacked else self.rank

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "use_rslora": self.use_rslora,
                "hf_targets": list(self.hf_targets),
                "stacked": {m: [list(p) for p in parts] for m, parts in self.stacked}, "peft_config": self.peft_config}

    @classmethod
    def from_json(cls, data: dict) -> "LoraSettings":
        try:
            stacked = tuple(sorted((m, tuple((str(p), int(r)) for p, r in parts))
                                   for m, parts in (data.get("stacked") or {}).items()))
            return cls(data["rank"], data["alpha"], tuple(data.get("targets") or TARGETS),
                       bool(data.get("use_rslora", False)), tuple(data.get("hf_targets") or ()), stacked,
                       data.get("peft_config"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConversionError(f"the checkpoint's adapter metadata is malformed: {exc!r}") from None


class LoraAdapter(torch.nn.Module):
    """`scale * linear_out(linear_in(x))`; `row`: `linear_in`'s output is a partial sum over TP ranks."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, row: bool, like: torch.Tensor):
        super().__init__()
        self.linear_in = torch.nn.Linear(in_features, rank, bias=False, dtype=like.dtype, device=like.device)
        self.linear_out = torch.nn.Linear(rank, out_features, bias=False, dtype=like.dtype, device=like.device)
        with torch.no_grad():  # like Megatron-Bridge and PEFT: B starts at zero, so the adapter starts as a no-op
            self.linear_out.weight.zero_()
        self.scale = scale
        self.row = row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_in(x)
        if self.row:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

            hidden = reduce_from_tensor_model_parallel_region(hidden)
        return self.linear_out(hidden) * self.scale


def _add_adapter(module, args, kwargs, output):
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + module.adapter(x).to(out.dtype), bias


def _sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
    """The base linear's sharded state, with the adapter weights sharded along their own TP axes."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    sharded_key = "adapter.linear_in.weight" if self.adapter.row else "adapter.linear_out.weight"
    axis = 1 if self.adapter.row else 0
    adapter_state = {f"adapter.{k}": v for k, v in self.adapter.state_dict(prefix="", keep_vars=True).items()}
    extra = make_sharded_tensors_for_checkpoint(adapter_state, prefix, {sharded_key: axis}, sharded_offsets)
    if self.lora_glu:  # [gate_r; up_r] rows, resharded as megatron-core reshards the base fc1 weight
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        key = f"{prefix}{sharded_key}"
        singleton = (metadata or {}).get("singleton_local_shards", False)
        extra[key] = apply_swiglu_sharded_factory(extra[key], sharded_offsets, singleton)
    state.update(extra)
    return state


def apply_lora(chunks, adapter: AdapterPlan, settings: LoraSettings) -> int:
    """Give every adapted linear of `chunks` its adapter (B zero). Returns the number of linears adapted."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    wanted = {t.module: t for t in adapter.targets if t.module.rsplit(".", 1)[-1] in settings.targets}
    count = 0
    for chunk in chunks:
        names = local_to_global(chunk)
        for local, tensor in named_tensors(chunk).items():
            target = wanted.get(names[local].removesuffix(".weight")) if local.endswith(".weight") else None
            if target is None:
                continue
            linear = chunk.get_submodule(local.removesuffix(".weight"))
            if hasattr(linear, "adapter"):
                raise UsageError(f"'{target.module}' already has an adapter")
            row = isinstance(linear, RowParallelLinear)
            if not (row or isinstance(linear, ColumnParallelLinear)) or row != (target.parallel == "row"):
                raise ConversionError(f"'{target.module}' is a {type(linear).__name__}, but LoRA here adapts "
                                      f"megatron-core's {target.parallel}-parallel linear (local layer spec), which "
                                      f"the spec shards it as", key=target.base.mcore, rule=target.base.span)
            if linear.config.sequence_parallel:
                raise UsageError("LoRA adapters with sequence parallelism are not supported (the adapter would see "
                                 "the sequence-sharded input)")
            out_features, in_features = tensor.shape
            linear.adapter = LoraAdapter(in_features, out_features, settings.module_rank(target.module),
                                         settings.scale, row, tensor)
            linear.lora_glu = target.module.endswith("linear_fc1") and bool(linear.config.gated_linear_unit)
            linear.register_forward_hook(_add_adapter, with_kwargs=True)
            linear.sharded_state_dict = types.MethodType(_sharded_state_dict, linear)
            count += 1
    return count


def adapter_tensors(chunks) -> dict[str, torch.Tensor]:
    """This rank's adapter weights by global name."""
    out = {}
    for chunk in chunks:
        names = local_to_global(chunk)
        for local, tensor in named_tensors(chunk).items():
            if ".adapter.linear_" in local:
                out[names[local]] = tensor
    return out


__all__ = ["LoraSettings", "LoraAdapter", "apply_lora", "adapter_tensors"]
