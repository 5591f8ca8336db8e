"""State-dict key mapping between FP8FlowGroupedMLP and Megatron's expert modules.

``FP8FlowGroupedMLP`` uses ``TEGroupedMLP``'s keys as they are (``linear_fc1.weight{i}`` [2F, H],
``linear_fc2.weight{i}`` [H, F]); ``SequentialMLP`` stores the same tensors as
``local_experts.{i}.linear_fc1.weight`` / ``local_experts.{i}.linear_fc2.weight``. Values are
never changed, only renamed, so a checkpoint converts both ways without loss.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

_GROUPED = re.compile(r"^(?P<pre>.*?)linear_fc(?P<fc>[12])\.weight(?P<i>\d+)$")
_SEQUENTIAL = re.compile(r"^(?P<pre>.*?)local_experts\.(?P<i>\d+)\.linear_fc(?P<fc>[12])\.weight$")


def grouped_to_sequential(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``...linear_fc1.weight3`` -> ``...local_experts.3.linear_fc1.weight``; other keys unchanged."""
    out = {}
    for k, v in state.items():
        m = _GROUPED.match(k)
        out[f"{m['pre']}local_experts.{m['i']}.linear_fc{m['fc']}.weight" if m else k] = v
    return out


def sequential_to_grouped(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``...local_experts.3.linear_fc1.weight`` -> ``...linear_fc1.weight3``; other keys unchanged."""
    out = {}
    for k, v in state.items():
        m = _SEQUENTIAL.match(k)
        out[f"{m['pre']}linear_fc{m['fc']}.weight{m['i']}" if m else k] = v
    return out
