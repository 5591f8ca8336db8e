"""Process-group set-up for runs without Megatron's own launcher: torch.distributed and
Megatron-Core's model-parallel groups (the training loop, ``fp8flow audit``, the tests)."""

from __future__ import annotations

import atexit
import os
from typing import Optional

import torch
import torch.distributed as dist


def init_parallel(rank: int = 0, world: int = 1, ep: int = 1, port: Optional[int] = None) -> None:
    """torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's model-parallel groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port or os.environ.get("MASTER_PORT") or (free_port() if world == 1 else 29531))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world)
        if backend == "gloo":
            # A process that exits with gloo's worker threads alive can abort in the interpreter's
            # finalization ("terminate called without an active exception"); NCCL only warns, and
            # its teardown after a failed rank could wait on the others, so it is left to the caller.
            atexit.unregister(shutdown_parallel)  # once, however often the groups are rebuilt
            atexit.register(shutdown_parallel)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    if not torch.cuda.is_available():
        from . import cpu_shims

        cpu_shims.apply()
    reseed(1234)


def shutdown_parallel() -> None:
    """Megatron's model-parallel groups and torch.distributed's process groups, destroyed while
    the interpreter is still whole; a no-op when there are none (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reseed(seed: int) -> None:
    """PyTorch's generators and Megatron's model-parallel RNG states from ``seed``. Megatron
    initializes the expert (and tensor-parallel) weights under its own states, which a model
    build moves on: two builds with one seed give the same weights only after this."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from . import cpu_shims

        cpu_shims.reseed(seed)


def enable_deterministic_algorithms() -> bool:
    """PyTorch's deterministic algorithms only (an op without one raises, naming itself), with
    cuBLAS's condition for them; returns the previous setting, to restore."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    return previous


def free_port() -> int:
    """A free local TCP port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
