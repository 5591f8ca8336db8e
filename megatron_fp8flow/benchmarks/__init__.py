"""GPU benchmarks. Each module measures one family of kernels against its baselines, side by side."""

from pathlib import Path

PAPER_RESULTS = Path(__file__).parent / "paper_results"
