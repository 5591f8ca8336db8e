"""MoE modules built on the FP8 dataflow (no Megatron needed to use them)."""

from .checkpoint import grouped_to_sequential, sequential_to_grouped
from .experts import FP8FlowGroupedMLP
from .settings import MODES, ExpertPrecision, FP8FlowSettings

__all__ = ["MODES", "ExpertPrecision", "FP8FlowGroupedMLP", "FP8FlowSettings", "grouped_to_sequential",
           "sequential_to_grouped"]
