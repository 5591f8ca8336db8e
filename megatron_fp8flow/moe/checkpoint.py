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


def _rename(state: Dict[str, torch.Tensor], pattern: re.Pattern, new_key: str) -> Dict[str, torch.Tensor]:
    """Keys matching ``pattern`` become ``new_key`` formatted with its groups; others and all values stay."""
    return {(new_key.format(**m.groupdict()) if (m := pattern.match(k)) else k): v for k, v in state.items()}


def grouped_to_sequential(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``...linear_fc1.weight3`` -> ``...local_experts.3.linear_fc1.weight``; other keys unchanged."""
    return _rename(state, _GROUPED, "{pre}local_experts.{i}.linear_fc{fc}.weight")


def sequential_to_grouped(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``...local_experts.3.linear_fc1.weight`` -> ``...linear_fc1.weight3``; other keys unchanged."""
    return _rename(state, _SEQUENTIAL, "{pre}linear_fc{fc}.weight{i}")
