"""FP8FlowTokenDispatcher: Megatron's all-to-all dispatcher with the FP8 dataflow.

Same six hooks as ``MoEAlltoAllTokenDispatcher``, for expert-tensor-parallel size 1, with or
without expert parallelism (EP = 1 needs no communication):

* dispatch: the tokens are quantized once (row-wise 1x128, power-of-two scales), grouped by
  expert (FP8 bytes and scales move, no arithmetic), sent through the all-to-all as FP8, and on
  arrival grouped by local expert and padded per expert to ``align`` rows in one fused pass.
* combine: unpad + un-sort, a bf16 all-to-all back, and the sum over each token's experts. In
  the backward the incoming gradient is quantized once and goes back the whole way as FP8
  (unpermute backward, all-to-all, unpad backward) into the expert block.

Modes (:class:`.settings.FP8FlowSettings`): ``flow`` / ``flow_double_quant`` as above;
``blockwise``: the BF16-centric baseline with FP8 all-to-all (quantize before and dequantize
after each all-to-all, bf16 everywhere else); ``bf16``: no FP8 at all.

Host syncs: one per layer forward, reading the routed-token counts of all ranks (Megatron's
dispatcher syncs for the same numbers); everything else is computed on the device.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from .. import gemm
from ..fp8.format import host_ints_to_device
from ..ops.cast import DequantizeGradient, DequantizeRows, QuantizeGradient, QuantizeRows
from ..ops.comm import AllToAllRows
from ..ops.permute import PermutePad, UnpadUnpermute, plan_permutation
from .settings import FP8FlowSettings


class FP8FlowTokenDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config, pg_collection=None,
                 settings: FP8FlowSettings = FP8FlowSettings()):
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        if self.tp_size > 1:
            raise ValueError(
                f"the FP8-flow dispatcher supports expert tensor parallel size 1, got {self.tp_size} "
                "(set --expert-tensor-parallel-size 1)"
            )
        if self.drop_and_pad or config.moe_expert_capacity_factor is not None:
            raise ValueError("the FP8-flow dispatcher is dropless: unset moe_expert_capacity_factor and "
                             "moe_pad_expert_input_to_capacity")
        if getattr(config, "moe_router_padding_for_quantization", False) or getattr(
                config, "moe_router_padding_for_fp8", False):
            raise ValueError("router padding for quantization is not needed with the FP8-flow dispatcher "
                             "(it pads every expert's rows itself); turn it off")
        self.settings = settings
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0

    @property
    def _quantizes_at_layer_edges(self) -> bool:
        """Tokens are quantized once entering the layer and the gradient once leaving it: always
        in the flow modes; in the blockwise baseline only around an actual all-to-all."""
        return self.settings.fp8_experts or (self.settings.fp8_dispatch and self.ep_size > 1)

    @property
    def _bf16_experts_after_fp8_all_to_all(self) -> bool:
        """The blockwise baseline: FP8 crosses the all-to-all, bf16 reaches the experts."""
        return self.settings.fp8_dispatch and not self.settings.fp8_experts

    # -- dispatch ---------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_shape[-1])
        if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError(f"routing_map must be a 2-D bool tensor, got {routing_map.dtype} {tuple(routing_map.shape)}")
        self._plan_counts(routing_map)
        self.align = self.settings.group_alignment(x.device)
        # Rows bound for the experts get the scale layout the GEMMs read; rows bound for the
        # all-to-all stay row-major (they travel as rows).
        self.mn_major = gemm.layouts(self.settings.gemm_backend, x.device).row_scales == "mn_major"
        local_align = self.align if self.ep_size == 1 else 1
        self.src_perm = plan_permutation(routing_map, self.config.moe_router_topk, local_align,
                                         tokens_per_expert=self.my_counts,
                                         mn_major_scales=self.mn_major and self.ep_size == 1)
        if self._quantizes_at_layer_edges:
            x = QuantizeRows.apply(x)  # the forward's one cast
        return PermutePad.apply(x, probs, self.src_perm)

    def _plan_counts(self, routing_map: torch.Tensor) -> None:
        """Routed-token counts of every rank and expert, on the host (the one sync)."""
        counts = routing_map.sum(0)
        if self.ep_size > 1:
            gathered = [torch.empty_like(counts) for _ in range(self.ep_size)]
            dist.all_gather(gathered, counts.contiguous(), group=self.ep_group)
            all_counts = torch.stack(gathered).tolist()
        else:
            all_counts = [counts.tolist()]
        L, r = self.num_local_experts, self.ep_rank
        self.my_counts = [int(v) for v in all_counts[r]]
        self.input_splits = [sum(self.my_counts[d * L:(d + 1) * L]) for d in range(self.ep_size)]
        self.output_splits = [sum(all_counts[s][r * L:(r + 1) * L]) for s in range(self.ep_size)]
        # Arrived rows come in chunks [source rank][local expert].
        self.chunk_counts = [int(all_counts[s][r * L + j]) for s in range(self.ep_size) for j in range(L)]
        self.local_counts = [sum(self.chunk_counts[s * L + j] for s in range(self.ep_size)) for j in range(L)]

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if self.ep_size == 1:
            return permutated_local_input_tokens, permuted_probs
        tokens = AllToAllRows.apply(permutated_local_input_tokens, self.output_splits, self.input_splits,
                                    self.ep_group)
        probs = AllToAllRows.apply(permuted_probs, self.output_splits, self.input_splits, self.ep_group)
        return tokens, probs

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if self.ep_size == 1:
            return global_input_tokens, list(self.src_perm.padded_sizes_host), global_probs
        L = self.num_local_experts
        dev = global_probs.device
        rows = sum(self.chunk_counts)
        chunk_expert, chunk_rows = host_ints_to_device([list(range(L)) * self.ep_size, self.chunk_counts], dev)
        expert_of_row = torch.repeat_interleave(chunk_expert.long(), chunk_rows.long(), output_size=rows)
        routing = F.one_hot(expert_of_row, L).bool()
        probs = routing.to(global_probs.dtype) * global_probs.reshape(-1, 1)
        self.dst_perm = plan_permutation(routing, 1, self.align, tokens_per_expert=self.local_counts,
                                         mn_major_scales=self.mn_major)
        tokens = global_input_tokens
        if self._bf16_experts_after_fp8_all_to_all:
            tokens = DequantizeRows.apply(tokens)  # the baseline's dequantize after the all-to-all
        rows_out, probs_out = PermutePad.apply(tokens, probs, self.dst_perm)
        return rows_out, list(self.dst_perm.padded_sizes_host), probs_out

    # -- combine ----------------------------------------------------------------------------
    def combine_preprocess(self, hidden_states):
        if self.ep_size == 1:
            return hidden_states
        rows = UnpadUnpermute.apply(hidden_states, self.dst_perm)
        if self._bf16_experts_after_fp8_all_to_all:
            rows = DequantizeGradient.apply(rows)  # the baseline's dequantize of the FP8 gradient
        return rows

    def token_combine(self, hidden_states, *args, **kwargs):
        if self.ep_size == 1:
            return hidden_states
        return AllToAllRows.apply(hidden_states, self.input_splits, self.output_splits, self.ep_group)

    def combine_postprocess(self, hidden_states):
        out = UnpadUnpermute.apply(hidden_states, self.src_perm)
        if self._quantizes_at_layer_edges:
            out = QuantizeGradient.apply(out)  # the backward's one cast
        return out.view(self.hidden_shape)
