"""MoE modules built on the FP8 dataflow (no Megatron needed to use them)."""

from .checkpoint import grouped_to_sequential, sequential_to_grouped
from .experts import MODES, ExpertPrecision, FP8FlowGroupedMLP

__all__ = ["MODES", "ExpertPrecision", "FP8FlowGroupedMLP", "grouped_to_sequential", "sequential_to_grouped"]
