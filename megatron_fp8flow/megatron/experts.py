"""FP8FlowExperts: Megatron's ``SequentialMLP`` with the plugin's expert computation.

The parameters, their initialization, names and (distributed) checkpoint layout are exactly
``SequentialMLP``'s (``local_experts.{i}.linear_fc1.weight`` [2F, H], ``...linear_fc2.weight``
[H, F], sharded per global expert), so a checkpoint moves between a stock MoE layer and the
plugin both ways unchanged. Only ``forward`` differs: all local experts in one
:class:`~megatron_fp8flow.moe.experts` block (grouped GEMMs, fused weighted SwiGLU, FP8 in the
FP8 modes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from ..fp8.format import GroupSplits
from ..moe.experts import ExpertPrecision, run_expert_block
from . import compat


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
        out = run_expert_block(tokens, permuted_probs.reshape(-1), groups, self.num_local_experts,
                               self.precision, self.expert_weights())
        return out, None

