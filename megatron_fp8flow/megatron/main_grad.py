"""fp32 main gradients with Megatron DDP's contract, for runs without Megatron's DDP.

Megatron's ``DistributedDataParallel`` gives every parameter a ``main_grad`` view into one fp32
buffer and a flag ``grad_added_to_main_grad``; layers that fuse the gradient accumulation add
their weight gradients into ``main_grad`` themselves and set the flag, and a hook after
autograd's accumulation adds any other ``.grad`` into ``main_grad`` and drops it. The compact
training loop and the benchmarks on a CPU (where Megatron's DDP cannot allocate its buffers)
use this class for the same contract, so a step accumulates gradients exactly as under
Megatron: in fp32, over all microbatches, with no per-parameter ``.grad`` left behind.

The plugin's expert weights are laid out fc1 of every expert, then fc2 of every expert, so each
linear's gradients form one [G, N, K] tensor that a k-grouped GEMM accumulates into in one
launch (under Megatron's DDP, :meth:`..experts.FP8FlowExperts.named_modules` gives the same).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn


def expert_weight_runs(model: nn.Module) -> List[List[nn.Parameter]]:
    """The plugin's expert weights that GEMMs accumulate into together: one list per linear
    (fc1 of every local expert, fc2 of every local expert) of every plugin expert block."""
    from .experts import FP8FlowExperts

    runs = []
    for m in model.modules():
        if isinstance(m, FP8FlowExperts):
            weights = m.expert_weights()
            e = m.num_local_experts
            runs += [weights[:e], weights[e:]]
    return runs


class MainGrads:
    """One fp32 buffer of main gradients for the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("MainGrads: the model has no trainable parameters")
        if any(hasattr(p, "main_grad") for p in params):
            raise ValueError("MainGrads: the parameters already carry main_grad buffers (Megatron's DDP, or "
                             "another MainGrads); attach one set only")
        first = {id(p) for run in expert_weight_runs(model) for p in run}
        ordered = [p for run in expert_weight_runs(model) for p in run if p.requires_grad]
        ordered += [p for p in params if id(p) not in first]
        self.params: Sequence[nn.Parameter] = ordered
        self.buffer = torch.zeros(sum(p.numel() for p in ordered), dtype=torch.float32, device=ordered[0].device)
        self._hooks = []
        offset = 0
        for p in ordered:
            p.main_grad = self.buffer[offset: offset + p.numel()].view(p.shape)
            p.grad_added_to_main_grad = False
            offset += p.numel()
            self._hooks.append(p.register_post_accumulate_grad_hook(_add_into_main_grad))

    def zero(self) -> None:
        """Start a step: zero the buffer and clear the flags (Megatron's ``zero_grad_buffer``)."""
        self.buffer.zero_()
        for p in self.params:
            p.grad_added_to_main_grad = False
            p.grad = None

    def remove(self) -> None:
        """Detach: drop the hooks and the attributes (the parameters are as they were)."""
        for h in self._hooks:
            h.remove()
        for p in self.params:
            del p.main_grad, p.grad_added_to_main_grad
        self._hooks, self.params = [], []


def _add_into_main_grad(param: torch.Tensor) -> None:
    if param.grad is not None and not param.grad_added_to_main_grad:
        param.main_grad.add_(param.grad)
    param.grad = None
