"""Every workaround needed to run megatron-core on a machine without a GPU (or without TransformerEngine), in one
place.

Contract: `apply()` is idempotent. Without TransformerEngine (on any machine) it applies `_NO_TE_PATCHES`; with a
GPU it does nothing else. On a CPU-only machine it also patches the CUDA-only call sites that megatron-core
(0.16.x, 0.19.x) reaches when it builds and runs models with the *local* layer specs, so that everything runs on
CPU tensors with the gloo backend. Each patch is guarded: a target that does not exist in the installed megatron-core
release is skipped, never an error. Nothing here changes numerics: every replacement computes the
same values as the CUDA original, on CPU.

Each `_patch_*` function documents its call site and why it is needed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable

import torch

_APPLIED = False


def apply() -> None:
    """Patch megatron-core (and `torch.cuda`) for CPU-only execution, and for running without TransformerEngine;
    idempotent; with a GPU and TransformerEngine, a no-op."""
    global _APPLIED
    if _APPLIED:
        return
    cpu = not torch.cuda.is_available()
    with _deferred_compile() if cpu else contextlib.nullcontext():  # the patches import megatron-core
        for patch in _NO_TE_PATCHES:
            patch()
        if cpu:
            for patch in _PATCHES:
                patch()
    _APPLIED = True


@contextlib.contextmanager
def _deferred_compile():
    """megatron-core decorates its fused kernels with `torch.compile` when its modules are imported, which
    imports torch._dynamo (over a second of every start-up) although a conversion never calls them. Meanwhile
    `torch.compile` answers a wrapper that calls the real one, with the same arguments, on its first call."""
    real = torch.compile

    def deferred(model=None, **options):
        if model is None:  # @torch.compile(...)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


def _module(name: str) -> types.ModuleType | None:
    """Import `name`, or answer None when this megatron-core release has no such module."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _replace(module_names: tuple[str, ...], attr: str, new: object) -> None:
    """Set `attr` to `new` in each listed module that already has it (covers `from x import f`)."""
    for name in module_names:
        module = _module(name)
        if module is not None and hasattr(module, attr):
            setattr(module, attr, new)


class _NoOpEvent:
    """Stands in for `torch.cuda.Event`: on CPU all work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoOpStream:
    """Stands in for `torch.cuda.Stream`: one synchronous CPU 'stream'; every method is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _NoOpEvent:
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _NoOpStream()


def _patch_current_device() -> None:
    """`torch.cuda.current_device()` answers "cpu".

    Call sites: rotary embedding `inv_freq`, TP layers' buffers, the MoE router and experts, the
    attention's tensors, p2p shape exchange -- all pass it as `device=`. Without a GPU the original
    raises "Torch not compiled with CUDA enabled"; "cpu" is a valid `device=` argument.
    """
    torch.cuda.current_device = lambda: "cpu"


def _patch_streams() -> None:
    """No-op `torch.cuda.Stream/Event/current_stream/stream/synchronize` and `Tensor.record_stream`.

    Call sites: `MoEAlltoAllTokenDispatcher.__init__` creates a class-level D2H stream and
    `_maybe_dtoh_and_synchronize` waits on it, records events and calls `record_stream` (every MoE
    layer); shared-expert overlap and the p2p pipeline code synchronize. On CPU the originals raise;
    CPU work is synchronous, so doing nothing is exact.
    """
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.record_stream = lambda self, stream: None


def _cpu_model_parallel_seed(seed: int, *args, **kwargs) -> None:
    """CPU replacement of `model_parallel_cuda_manual_seed`: seed the CPU RNG, use the inference tracker.

    The inference tracker's `fork()` is a null context, so every RNG draw comes from the CPU generator.
    With `use_cpu_initialization=True` megatron-core draws the *full* weight and slices it, so one seed
    gives the same full weights at any TP size.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    torch.manual_seed(seed)
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _patch_rng_seed() -> None:
    """`model_parallel_cuda_manual_seed` seeds the CPU RNG instead of CUDA generators.

    Call site: model-parallel initialisation (`specbridge.runtime.parallel.init_parallel`, tests,
    megatron utilities). The original calls `torch.cuda.manual_seed` and reads CUDA generator state.
    """
    _replace(
        ("megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel"),
        "model_parallel_cuda_manual_seed",
        _cpu_model_parallel_seed,
    )


def _patch_te_general_gemm() -> None:
    """Define `moe_utils.te_general_gemm = None` when the module lacks it.

    Call site: the MoE router gating (`RouterGatingLinearFunction.forward`) tests
    `te_general_gemm is not None`; megatron-core 0.16.1 binds the name only when TransformerEngine
    imports, so without TE every MoE forward raises NameError. None selects the torch matmul path.
    """
    module = _module("megatron.core.transformer.moe.moe_utils")
    if module is not None and not hasattr(module, "te_general_gemm"):
        module.te_general_gemm = None


def _maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """`maybe_move_tensor_to_cpu` that also converts CPU tensors to numpy when `as_numpy`."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    if torch.is_tensor(tensor):
        return tensor.cpu()
    return tensor


def _patch_split_sizes() -> None:
    """`maybe_move_tensor_to_cpu(..., as_numpy=True)` returns numpy for CPU tensors too.

    Call site: the all-to-all token dispatcher's input/output split sizes (EP > 1). The original
    converts only CUDA tensors, so on CPU the splits stay tensors and gloo's `all_to_all_single`
    rejects them; numpy arrays become plain integer lists there, as on GPU.
    """
    _replace(
        ("megatron.core.transformer.moe.moe_utils", "megatron.core.transformer.moe.token_dispatcher"),
        "maybe_move_tensor_to_cpu",
        _maybe_move_tensor_to_cpu,
    )


def _default_causal_mask(sq: int) -> torch.Tensor:
    """CPU `get_default_causal_mask`: True above the diagonal (masked)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """CPU `get_sliding_window_causal_mask`, same arithmetic as megatron-core's."""
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


_MASK_MODULES = ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax")


def _patch_causal_masks() -> None:
    """CPU versions of `get_default_causal_mask` and `get_sliding_window_causal_mask`.

    Call site: `FusedScaleMaskSoftmax.forward_torch_softmax` builds the mask when attention_mask is
    None (GPTModel's default) or a sliding window is set; the originals allocate on `device="cuda"`.
    """
    _replace(_MASK_MODULES, "get_default_causal_mask", _default_causal_mask)
    _replace(_MASK_MODULES, "get_sliding_window_causal_mask", _sliding_window_causal_mask)


def _cpu_device(kwargs: dict) -> dict:
    """Copy of `kwargs` with a CUDA `device=` mapped to CPU."""
    device = kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        kwargs = {**kwargs, "device": "cpu"}
    return kwargs


def _cpu_factory(factory: Callable) -> Callable:
    """Wrap a torch tensor factory so that `device="cuda"` allocates on CPU."""
    return lambda *args, **kwargs: factory(*args, **_cpu_device(kwargs))


class _CpuTorch(types.ModuleType):
    """A view of `torch` whose `zeros` maps `device="cuda"` to CPU; everything else is torch itself."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.zeros = _cpu_factory(torch.zeros)

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _patch_pipeline_schedules() -> None:
    """Pipeline schedules see a `torch` whose `zeros(device="cuda")` allocates on CPU.

    Call site: `forward_backward_no_pipelining` / `..._pipelining_*` allocate `total_num_tokens`
    with `torch.zeros([], device="cuda")` (PP > 1 through `get_forward_backward_func`). Only that
    module's global name `torch` is redirected; the rest of the process keeps the real module.
    """
    module = _module("megatron.core.pipeline_parallel.schedules")
    if module is not None and getattr(module, "torch", None) is torch:
        module.torch = _CpuTorch()


def _patch_tied_embedding_setup() -> None:
    """`Tensor.cuda()` is the identity while a language model ties its embedding across pipeline stages.

    Call site: `LanguageModule.setup_embeddings_and_output_layer` moves the shared embedding / output weight with
    `weight.data.cuda()` before all-reducing it over the embedding group (PP > 1 with tied embeddings).
    """
    module = _module("megatron.core.models.common.language_module.language_module")
    cls = getattr(module, "LanguageModule", None) if module is not None else None
    original = getattr(cls, "setup_embeddings_and_output_layer", None)
    if original is None or getattr(original, "_specbridge_cpu", False):
        return

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    setup_embeddings_and_output_layer._specbridge_cpu = True
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _patch_mla_without_te() -> None:
    """megatron-core 0.16's multi-latent attention believes TransformerEngine is installed when it is not.

    Call site: `MultiLatentAttention.__init__` tests `HAVE_TE and isinstance(self.linear_proj, TELinear)`; 0.16.1
    sets its own `HAVE_TE` from importing `megatron.core.extensions.transformer_engine`, which succeeds without
    TransformerEngine and hands out stand-in objects, so `isinstance` raises TypeError for every MLA layer. The
    extensions module's own `HAVE_TE` (False) is the truth; 0.19 already reads it. Without TE the TE-only branches
    are skipped, as on 0.19.
    """
    extensions = _module("megatron.core.extensions.transformer_engine")
    module = _module("megatron.core.transformer.multi_latent_attention")
    if extensions is None or module is None or getattr(extensions, "HAVE_TE", True):
        return
    if getattr(module, "HAVE_TE", False):
        module.HAVE_TE = False
        for name in ("TEColumnParallelLinear", "TELinear", "Linear", "set_save_original_input"):
            if hasattr(module, name):
                setattr(module, name, None)


# applied whenever TransformerEngine is not installed, with or without a GPU
_NO_TE_PATCHES = (_patch_mla_without_te,)

_PATCHES = (
    _patch_tied_embedding_setup,
    _patch_current_device,
    _patch_streams,
    _patch_rng_seed,
    _patch_te_general_gemm,
    _patch_split_sizes,
    _patch_causal_masks,
    _patch_pipeline_schedules,
)

__all__ = ["apply"]
