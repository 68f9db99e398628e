"""What Megatron-Bridge 0.6.2 (megatron-core 0.19.2) needs to run on a CPU-only machine, for the side-by-side
bench only: an import-only `transformer_engine` placeholder (MB imports it at module level), no-op CUDA streams
and events at the call sites its build / load / export reach, and megatron-core's RNG tracker on the CPU."""

import contextlib
import sys
import types

import torch


class _Anything(type):
    """A class whose every attribute is itself (so `te.pytorch.Linear` etc. resolve at import)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _Placeholder(metaclass=_Anything):
    def __init__(self, *args, **kwargs):
        pass


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder


def install_te_placeholder() -> None:
    import megatron.core  # noqa: F401  (megatron-core's own HAVE_TE checks run first and see no TE)

    for name in ("transformer_engine", "transformer_engine.pytorch"):
        module = sys.modules.setdefault(name, _PlaceholderModule(name))
        module.__path__, module.__spec__, module.__version__ = [], None, "2.9.0"
    sys.modules["transformer_engine"].pytorch = sys.modules["transformer_engine.pytorch"]


class _Event:
    def __init__(self, *args, **kwargs): pass
    def record(self, *args, **kwargs): pass
    def wait(self, *args, **kwargs): pass
    def synchronize(self): pass
    def query(self): return True


class _Stream(_Event):
    def wait_stream(self, *args): pass
    def wait_event(self, *args): pass
    def record_event(self, event=None): return event or _Event()


def patch_cuda() -> None:
    stream = _Stream()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream, torch.cuda.Event = _Stream, _Event
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # save_megatron_model's RNG record
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.record_stream = lambda self, s: None


def cpu_rng(seed: int = 1234) -> None:
    from megatron.core.tensor_parallel import random

    torch.manual_seed(seed)
    random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def init(tp: int) -> None:
    """gloo + megatron's parallel state, with the CPU patches (call before building a model)."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo")
    patch_cuda()
    parallel_state.initialize_model_parallel(tp, 1)
    cpu_rng()
