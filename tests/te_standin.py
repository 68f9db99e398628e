"""A stand-in for TransformerEngine's PyTorch modules, for tests only: enough of `transformer_engine` for
megatron-core's own TE wrappers (`megatron.core.extensions.transformer_engine`) and TE layer specs to build a model
and give its `sharded_state_dict()` on a machine without TE or a GPU. Nothing here computes: the leaf modules hold
parameters with TE's names and shapes (per tensor-parallel rank) and TE 2.x's extra state (an empty byte tensor
without FP8), and refuse a forward. Every key, global shape and offset of the checkpoint comes from megatron-core's
code; the stand-in answers only what TE itself would own: its parameter names and shapes.

`install()` must run before megatron-core is imported (a fresh interpreter: megatron-core binds TE at import).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from unittest.mock import MagicMock

import torch

VERSION = "2.8.0"


class _Module(torch.nn.Module):
    """TE's base module: FP8 bookkeeping megatron-core reads, TE 2.x's extra state (empty without FP8)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.fp8 = self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False}
        self.dtype = kwargs.get("params_dtype") or torch.float32
        self.device = kwargs.get("device")
        self.loaded_extra_state = []  # what `set_extra_state` was given (a test reads it)

    def _param(self, name: str, *shape: int) -> None:
        self.register_parameter(name, torch.nn.Parameter(torch.zeros(shape, dtype=self.dtype, device=self.device)))

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        """Without FP8 (never enabled here), TE's leaves the metadata as it is."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state.append(state)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the TransformerEngine stand-in names tensors only; it does not compute")


def _local(in_features, out_features, parallel_mode, tp_size):
    """(out, in) of one tensor-parallel rank's weight, as TE splits it."""
    tp_size = tp_size or 1
    if parallel_mode == "column":
        return out_features // tp_size, in_features
    if parallel_mode == "row":
        return out_features, in_features // tp_size
    return out_features, in_features


class Linear(_Module):
    def __init__(self, in_features, out_features, bias=True, parallel_mode=None, tp_size=1, **kwargs):
        super().__init__(**kwargs)
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self.parallel_mode, self.tp_size = parallel_mode, tp_size
        out, inp = _local(in_features, out_features, parallel_mode, tp_size)
        self._param("weight", out, inp)
        if bias:
            self._param("bias", out)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, bias=True, normalization="LayerNorm", **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._param("layer_norm_weight", in_features)
        if normalization == "LayerNorm":
            self._param("layer_norm_bias", in_features)


class GroupedLinear(_Module):
    def __init__(self, num_gemms, in_features, out_features, bias=True, parallel_mode=None, tp_size=1, **kwargs):
        super().__init__(**kwargs)
        self.num_gemms, self.in_features, self.out_features, self.use_bias = num_gemms, in_features, out_features, bias
        self.parallel_mode, self.tp_size = parallel_mode, tp_size
        out, inp = _local(in_features, out_features, parallel_mode, tp_size)
        for i in range(num_gemms):
            self._param(f"weight{i}", out, inp)
            if bias:
                self._param(f"bias{i}", out)


class _Norm(_Module):
    def __init__(self, hidden_size=None, eps=1e-5, bias=False, normalized_shape=None, **kwargs):
        super().__init__(**kwargs)
        hidden_size = hidden_size if hidden_size is not None else normalized_shape  # TE 2.x names it so
        self._param("weight", hidden_size)
        if bias:
            self._param("bias", hidden_size)


class RMSNorm(_Norm):
    pass


class LayerNorm(_Norm):
    def __init__(self, hidden_size=None, eps=1e-5, **kwargs):
        super().__init__(hidden_size, eps, bias=True, **kwargs)


class DotProductAttention(_Module):
    def __init__(self, num_attention_heads, kv_channels, **kwargs):
        super().__init__(**kwargs)


def get_cpu_offload_context(*args, **kwargs):
    """No offloading: (a context that does nothing, no sync function)."""
    import contextlib

    return contextlib.nullcontext(), None


LEAVES = {"Linear": Linear, "LayerNormLinear": LayerNormLinear, "GroupedLinear": GroupedLinear,
          "RMSNorm": RMSNorm, "LayerNorm": LayerNorm, "DotProductAttention": DotProductAttention}


class _AnyAttribute(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return MagicMock(name=f"{cls.__name__}.{name}")


class _StandInModule(types.ModuleType):
    """A `transformer_engine.*` module: the leaves above where TE has them; anything else megatron-core looks up is
    an empty class (a name TE spells as a class: megatron-core tests instances against it, e.g. FP8 tensors, which
    nothing here is) or a MagicMock (what megatron-core itself puts in TE's place when TE is absent)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            value = _AnyAttribute(name, (), {})
        else:
            value = MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "transformer_engine" or fullname.startswith("transformer_engine."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        if spec.name == "transformer_engine":
            module.__version__ = VERSION
        if spec.name == "transformer_engine.pytorch":
            for name, cls in LEAVES.items():
                setattr(module, name, cls)
        if spec.name == "transformer_engine.pytorch.cpu_offload":
            module.get_cpu_offload_context = get_cpu_offload_context
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Make `import transformer_engine` answer the stand-in (before megatron-core is imported)."""
    if any(name == "megatron.core" or name.startswith("megatron.core.") for name in sys.modules):
        raise RuntimeError("install the TransformerEngine stand-in before megatron-core is imported")
    sys.meta_path.insert(0, _Finder())
    import transformer_engine  # noqa: F401
    import transformer_engine.pytorch  # noqa: F401
