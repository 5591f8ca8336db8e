"""FP8FlowExperts: Megatron's ``SequentialMLP`` with the plugin's expert computation.

The parameters, their initialization, names and (distributed) checkpoint layout are exactly
``SequentialMLP``'s (``local_experts.{i}.linear_fc1.weight`` [2F, H], ``...linear_fc2.weight``
[H, F], sharded per global expert), so a checkpoint moves between a stock MoE layer and the
plugin both ways unchanged. Only ``forward`` differs: all local experts in one
:class:`~megatron_fp8flow.moe.experts` block (grouped GEMMs, fused weighted SwiGLU, FP8 in the
FP8 modes).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from ..fp8.format import GroupSplits
from ..moe.experts import ExpertPrecision, quantize_expert_weights, run_expert_block
from . import compat

logger = logging.getLogger(__name__)


def install_first_microbatch_marks() -> None:
    """Let Megatron's schedules mark the plugin's experts on each step's first microbatch.

    The schedules call ``model.set_is_first_microbatch()`` on every step's first microbatch,
    but Megatron only forwards it to modules when ``config.fp8`` (TransformerEngine) is on. This
    wraps that method, once and idempotently, to also mark every :class:`FP8FlowExperts`."""
    from megatron.core.transformer.module import MegatronModule

    original = MegatronModule.set_is_first_microbatch
    if getattr(original, "_marks_fp8flow_experts", False):
        return

    def set_is_first_microbatch(self):
        original(self)
        experts = self.__dict__.get("_fp8flow_experts")
        if experts is None:
            experts = [m for m in self.modules() if isinstance(m, FP8FlowExperts)]
            self.__dict__["_fp8flow_experts"] = experts
        for m in experts:
            m.is_first_microbatch = True

    set_is_first_microbatch._marks_fp8flow_experts = True
    MegatronModule.set_is_first_microbatch = set_is_first_microbatch


def _check_config(config, num_local_experts: int) -> None:
    problems = []
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        problems.append("the experts must be SwiGLU (gated_linear_unit=True, activation_func=silu)")
    if config.add_bias_linear:
        problems.append("expert linear layers must have no bias (add_bias_linear=False)")
    if getattr(config, "expert_tensor_parallel_size", 1) not in (None, 1):
        problems.append(f"expert tensor parallelism is not supported (expert_tensor_parallel_size="
                        f"{config.expert_tensor_parallel_size}; use 1)")
    if getattr(config, "moe_apply_probs_on_input", False):
        problems.append("moe_apply_probs_on_input is not supported (probs are applied in the SwiGLU)")
    if problems:
        raise ValueError("FP8FlowExperts: " + "; ".join(problems))


class FP8FlowExperts(SequentialMLP):
    """Routed experts of one MoE layer, computed by the plugin."""

    def __init__(self, num_local_experts, config, submodules=None, pg_collection=None,
                 precision: ExpertPrecision = ExpertPrecision(), **kwargs):
        _check_config(config, num_local_experts)
        if submodules is None:
            submodules = compat.local_expert_mlp_submodules()
        if pg_collection is None:
            pg_collection = compat.default_pg_collection()
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs)
        self.precision = precision
        self._fp8_weights = None  # (parameter addresses, FP8 weights) of this step, with cache_fp8_weights
        self._first = False
        self._uses = 0  # training calls since the step's first microbatch
        self._marked = False  # Megatron's schedules have marked a first microbatch at least once
        if precision.cache_fp8_weights:
            install_first_microbatch_marks()

    @property
    def is_first_microbatch(self) -> bool:
        """Set by Megatron's schedules (``set_is_first_microbatch``) on each step's first
        microbatch: the FP8 weights are quantized then and reused by the step's other ones."""
        return self._first

    @is_first_microbatch.setter
    def is_first_microbatch(self, value: bool) -> None:
        self._first = bool(value)
        self._marked = self._marked or self._first

    def _step_fp8_weights(self, weights):
        """The FP8 weights this call uses: None (quantize in the call) unless the cache is asked
        for and the schedules mark first microbatches; then quantized on the first microbatch of
        a step (or when the parameters moved) and reused by the others."""
        if not (self.precision.cache_fp8_weights and self.precision.mode != "bf16"):
            return None
        if not self._marked:
            if not getattr(self, "_warned_unmarked", False):
                logger.warning("cache_fp8_weights: nothing marks the first microbatch of a step (Megatron's "
                               "schedules do); quantizing the expert weights in every call")
                self._warned_unmarked = True
            return None
        if not torch.is_grad_enabled() and not self._first and self._fp8_weights is None:
            return None  # an evaluation between steps: its own copies, not kept
        where = tuple(w.data_ptr() for w in weights)
        if self._first or self._fp8_weights is None or self._fp8_weights[0] != where:
            if self._first:
                self._uses = 0
            self._fp8_weights = None  # the old copies go before the new ones are made
            self._fp8_weights = (where, quantize_expert_weights(weights, self.num_local_experts))
            self._first = False
        fp8_weights = self._fp8_weights[1]
        if torch.is_grad_enabled():  # a training forward (or its recomputation), not evaluation
            self._uses += 1
            if self._uses == compat.microbatches_per_step():
                # The step's last microbatch: its backward keeps these copies alive until it is
                # done and nothing needs them later, so they are not held through the optimizer
                # step (a later call this step quantizes again: slower, never stale).
                self._fp8_weights = None
        return fp8_weights

    def release_fp8_weights(self) -> None:
        """The step's microbatches are done: drop its cached FP8 weights before the optimizer
        changes the parameters in place (where nothing tells the experts how many microbatches
        a step has, as in the compact loop; Megatron's schedules need no call)."""
        self._fp8_weights = None
        self._uses = 0

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The submodules with every expert's fc2 after the rest, last expert first, then every
        expert's fc1, last expert first. Only the order differs from ``nn.Module``'s (names,
        state dict and checkpoints are unchanged); it is the order Megatron's DDP reads
        ``named_parameters()`` in and then reverses to lay out its buffers, so each linear's
        expert gradients (and, with the distributed optimizer, its weights) end up back to back
        in expert order: one [G, N, K] tensor that a single-launch grouped GEMM reads or
        accumulates into, instead of fc1 and fc2 alternating. (An optimizer state saved by
        parameter index, as torch's own is, follows this order.)"""
        entries = list(super().named_modules(memo, prefix, remove_duplicate))
        last = self.num_local_experts - 1
        rank = {}
        for i, expert in enumerate(self.local_experts):
            for linear_rank, linear in ((0, getattr(expert, "linear_fc2", None)), (1, getattr(expert, "linear_fc1", None))):
                for m in (linear.modules() if linear is not None else ()):
                    rank[id(m)] = (linear_rank, last - i)
        head = [entry for entry in entries if id(entry[1]) not in rank]
        tail = sorted((entry for entry in entries if id(entry[1]) in rank), key=lambda entry: rank[id(entry[1])])
        return iter(head + tail)

    def expert_weights(self):
        """fc1 weights of every local expert, then fc2's (the block's parameter order)."""
        return ([e.linear_fc1.weight for e in self.local_experts]
                + [e.linear_fc2.weight for e in self.local_experts])

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        tokens = permuted_local_hidden_states
        if isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = tokens_per_expert.tolist()  # host sizes; the plugin's dispatcher passes a list
        sizes = [int(v) for v in tokens_per_expert]
        groups = GroupSplits.build(sizes, tokens.shape[0], tokens.device)
        weights = self.expert_weights()
        out = run_expert_block(tokens, permuted_probs.reshape(-1), groups, self.num_local_experts,
                               self.precision, weights, self._step_fp8_weights(weights))
        return out, None


def release_fp8_weights(model: torch.nn.Module) -> None:
    """:meth:`FP8FlowExperts.release_fp8_weights` on every plugin expert block of ``model``."""
    for m in model.modules():
        if isinstance(m, FP8FlowExperts):
            m.release_fp8_weights()
