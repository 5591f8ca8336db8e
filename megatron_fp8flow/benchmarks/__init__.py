"""GPU benchmarks. Each module measures one family of kernels against its baselines, side by side."""

from .common import PAPER_RESULTS

__all__ = ["PAPER_RESULTS"]
