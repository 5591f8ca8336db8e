"""Shims that let stock megatron-core run on a CPU (CI, the CPU demo). Applied only explicitly.

Unpatched, Megatron-Core assumes CUDA past ``initialize_model_parallel()``. :func:`apply`
patches, for this process only:

1. ``torch.cuda.current_device`` -> ``"cpu"`` (RoPE, buffers and router weights are placed on it);
2. a CPU RNG tracker in place of Megatron's CUDA RNG states tracker;
3. ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream`` / ``synchronize`` -> no-op
   stand-ins (the all-to-all dispatcher creates a side stream when it is built; distributed
   checkpointing synchronizes before writing);
4. megatron-core 0.15 / 0.16: ``moe_utils.te_general_gemm = None`` (without TE it is otherwise
   a name that fails when the router runs);
5. the stock all-to-all dispatcher's ``maybe_move_tensor_to_cpu`` gives host split sizes as
   lists for CPU tensors too (it leaves them tensors, which ``all_to_all_single`` rejects).

It refuses to run when CUDA is available: on a GPU none of this may happen.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)
_applied = False


class _CpuRngTracker:
    """The interface of Megatron's CUDA RNG states tracker, with torch's CPU generator."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return True

    def reset(self):
        self.states_, self.seeds_ = {}, set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        g = torch.Generator().manual_seed(seed)
        self.states_[name] = g.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            self.add(name, 1234 + len(self.states_))
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoEvent()

    def synchronize(self):
        pass


class _NoEvent(_NoStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


def reseed(seed: int) -> None:
    """The CPU tracker's states from ``seed``, with the offsets Megatron's
    model_parallel_cuda_manual_seed gives them on a GPU."""
    from megatron.core.tensor_parallel import random as mrandom

    from megatron.core import parallel_state as ps

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                + ps.get_expert_tensor_parallel_rank())
    tracker.add("data-parallel-rng", seed)


def apply() -> None:
    """Patch this process so stock megatron-core runs on the CPU (idempotent)."""
    global _applied
    if torch.cuda.is_available():
        raise RuntimeError("megatron_fp8flow.megatron.cpu_shims is for CPU-only runs; a GPU is present")
    if _applied:
        return
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()  # seeded by reseed (parallel.init_parallel)
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if getattr(moe_utils, "te_general_gemm", None) is None:  # 0.16 refers to it without defining it
        moe_utils.te_general_gemm = None
    from megatron.core.transformer.moe import token_dispatcher

    original_move = token_dispatcher.maybe_move_tensor_to_cpu

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.tolist()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host
    _applied = True
    logger.info("megatron_fp8flow: CPU shims applied (torch.cuda stand-ins, CPU RNG tracker)")
