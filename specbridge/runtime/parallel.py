"""Parallel topology: check the requested sizes, bring up torch.distributed + megatron-core model parallelism, and
describe this rank's place in it. The one module that reads megatron-core's `parallel_state`.

Contract: `check_sizes(...)` refuses sizes that cannot work (one `UsageError` line, the same on every rank, before
megatron-core is touched). `init_parallel()` leaves the process with an initialised default process group (nccl with
a GPU, gloo without; a single-process world of 1 when not launched by torchrun), megatron-core's
`parallel_state` initialised with the requested sizes, and the model-parallel RNG seeded. `destroy_parallel()`
undoes all of it, so tests may init / destroy / init again in one process. `current_topology()` reads the ranks
and sizes back as one frozen `Topology`; `tp_group` / `ep_group` answer megatron-core's process groups.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError
from . import cpu_compat


@dataclass(frozen=True, slots=True)
class Topology:
    """This rank's place in the megatron-core parallel layout (sizes >= 1, ranks 0-based). `Topology()` is the
    single process. `vpp_size` is the number of virtual pipeline stages (model chunks) per rank."""

    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    expert_dp_rank: int = 0
    vpp_size: int = 1

    def vp_stages(self) -> list[int | None]:
        """The virtual stage of each model chunk this rank builds (None: no interleaving)."""
        return list(range(self.vpp_size)) if self.vpp_size > 1 else [None]

    def is_first_stage(self, vp_stage: int | None = None) -> bool:
        """This rank's chunk `vp_stage` is the first of the whole pipeline (it holds the embedding)."""
        return self.pp_rank == 0 and vp_stage in (None, 0)

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        """This rank's chunk `vp_stage` is the last of the whole pipeline (final norm and output layer)."""
        return self.pp_rank == self.pp_size - 1 and vp_stage in (None, self.vpp_size - 1)

    def transformer_fields(self) -> dict:
        """megatron-core `TransformerConfig`'s parallel-size fields (GPTModel decides how many layers a stage builds
        from the config, not from parallel_state, so a builder must pass these)."""
        return dict(
            tensor_model_parallel_size=self.tp_size,
            pipeline_model_parallel_size=self.pp_size,
            virtual_pipeline_model_parallel_size=self.vpp_size if self.vpp_size > 1 else None,
            expert_model_parallel_size=self.ep_size,
            expert_tensor_parallel_size=self.etp_size,
        )


def check_sizes(world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                vpp: int | None = None, launched: bool = True) -> None:
    """Refuse parallel sizes that cannot work for `world_size` processes, in one line naming the flags (the same
    error on every rank: it depends on the arguments only). `launched`: the processes were started by torchrun."""
    etp = tp if etp is None else etp
    flags = {"--tp": tp, "--pp": pp, "--ep": ep, "--etp": etp, "--vpp": 1 if vpp is None else vpp}
    bad = [f"{flag} {size}" for flag, size in flags.items() if size < 1]
    if bad:
        raise UsageError(f"parallel sizes must be at least 1 (got {', '.join(bad)})", on_every_rank=True)
    if vpp is not None and vpp > 1 and pp == 1:
        raise UsageError(f"--vpp {vpp} interleaves pipeline stages and needs --pp > 1", on_every_rank=True)
    model, need = tp * pp, math.lcm(tp * pp, etp * ep * pp)
    if not launched and need > 1:
        asked = " ".join(f"{flag} {size}" for flag, size in flags.items() if size > 1 and (flag != "--etp" or etp != tp))
        raise UsageError(f"{asked} needs {need} processes (or a multiple), and this is one: launch it with "
                         f"torchrun --nproc-per-node {need} -m specbridge ...", on_every_rank=True)
    if world_size % model:
        raise UsageError(f"{world_size} processes do not split into tensor x pipeline parallel groups of --tp {tp} "
                         f"x --pp {pp} = {model}: use a world size that is a multiple of {model}", on_every_rank=True)
    if world_size % (etp * ep * pp):
        raise UsageError(f"{world_size} processes do not split into expert groups of --etp {etp} x --ep {ep} x --pp "
                         f"{pp} = {etp * ep * pp}: use a world size that is a multiple of it (--etp defaults to "
                         f"--tp)", on_every_rank=True)


def _free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _init_process_group() -> None:
    """Create the default process group unless one exists; single-process world when not under torchrun. A group
    created here is destroyed when the interpreter exits (`_destroy_at_exit`)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if launched_by_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    else:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(backend=backend, rank=0, world_size=1)
    atexit.unregister(_destroy_at_exit)  # once, however often a group is created in this process
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    """Destroy the process groups while the interpreter is still whole: a gloo group left to the interpreter's
    teardown may have its worker threads destroyed while joinable, and the process then dies of SIGABRT
    ("terminate called without an active exception") after its work is done."""
    if "megatron.core.parallel_state" in sys.modules:
        destroy_parallel()
    elif dist.is_initialized():
        dist.destroy_process_group()


def _seed(seed: int) -> None:
    """Seed megatron-core's model-parallel RNG (CUDA generators, or the CPU stand-in from cpu_compat)."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.model_parallel_cuda_manual_seed(seed)


def init_world(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, vpp: int | None = None) -> None:
    """Initialise torch.distributed only (what reading a checkpoint's tensors directly needs: megatron-core is not
    touched); the parallel sizes are checked against the world all the same."""
    launched = dist.is_initialized() or launched_by_torchrun()
    _init_process_group()
    check_sizes(dist.get_world_size(), tp, pp, ep, etp, vpp, launched=launched)


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int = 1234,
) -> Topology:
    """Initialise torch.distributed, check the sizes (before megatron-core is touched), initialise megatron-core's
    parallel state; answer this rank's Topology.

    `etp` (expert tensor parallel size) defaults to `tp`, as in megatron-core; `vpp` is the number of virtual
    pipeline stages per rank (None or 1: no interleaving).
    """
    launched = dist.is_initialized() or launched_by_torchrun()
    _init_process_group()  # first, so that the ranks can still meet after an error (to end together)
    check_sizes(dist.get_world_size(), tp, pp, ep, etp, vpp, launched=launched)
    cpu_compat.apply()
    from megatron.core import parallel_state

    global _initialised
    sizes = (dist.get_world_size(), tp, pp, ep, etp or tp, vpp if vpp is not None and vpp > 1 else None)
    # the same layout again (tests, repeated API calls) reuses megatron-core's groups: destroying them does not free
    # their gloo threads, so re-creating them on every call would pile up threads in a long-lived process
    if not (parallel_state.model_parallel_is_initialized() and _initialised == sizes):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=sizes[5],
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
        _initialised = sizes
    _seed(seed)
    return current_topology()


_initialised: tuple | None = None  # the sizes megatron-core's parallel state was last initialised with here


def destroy_parallel() -> None:
    """Tear down megatron-core parallel state and the default process group (safe when absent)."""
    from megatron.core import parallel_state

    global _initialised
    parallel_state.destroy_model_parallel()
    _initialised = None
    if dist.is_initialized():
        dist.destroy_process_group()


def current_topology() -> Topology:
    """Read this rank's Topology from megatron-core's parallel_state (must be initialised)."""
    from megatron.core import parallel_state as ps

    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def transformer_fields() -> dict:
    """`Topology.transformer_fields()` of this rank; empty when megatron-core's parallel state is not initialised."""
    from megatron.core import parallel_state as ps

    return current_topology().transformer_fields() if ps.model_parallel_is_initialized() else {}


def tp_group(expert: bool = False):
    """The process group of this rank's tensor parallel group (the expert-TP group for expert tensors)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()


def ep_group():
    """The process group of this rank's expert parallel group."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group()
