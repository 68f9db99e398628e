"""Parallel topology: bring up torch.distributed + megatron-core model parallelism, and describe it.

Contract: `init_parallel()` leaves the process with an initialised default process group (nccl with
a GPU, gloo without; a single-process world of 1 when not launched by torchrun), megatron-core's
`parallel_state` initialised with the requested sizes, and the model-parallel RNG seeded.
`destroy_parallel()` undoes all of it, so tests may init / destroy / init again in one process.
`current_topology()` reads the ranks and sizes back from `parallel_state`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from specbridge.runtime import cpu_compat


@dataclass(frozen=True, slots=True)
class Topology:
    """This rank's place in the megatron-core parallel layout (sizes are >= 1, ranks 0-based)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: int
    expert_dp_rank: int = 0


def _free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _init_process_group() -> None:
    """Create the default process group unless one exists; single-process world when not under torchrun."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if _launched_by_torchrun():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group(backend=backend, rank=0, world_size=1)


def _seed(seed: int) -> None:
    """Seed megatron-core's model-parallel RNG (CUDA generators, or the CPU stand-in from cpu_compat)."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.model_parallel_cuda_manual_seed(seed)


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int = 1234,
) -> Topology:
    """Initialise torch.distributed and megatron-core parallel state; answer this rank's Topology.

    `etp` (expert tensor parallel size) defaults to `tp`, as in megatron-core; `vpp` is the number
    of virtual pipeline stages per rank (None: no interleaving). World size must be divisible by
    tp * pp (and by etp * ep * pp), else megatron-core raises.
    """
    cpu_compat.apply()
    from megatron.core import parallel_state

    _init_process_group()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    _seed(seed)
    return current_topology()


def destroy_parallel() -> None:
    """Tear down megatron-core parallel state and the default process group (safe when absent)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
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
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )
