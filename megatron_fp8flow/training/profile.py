"""Where one training step goes: the device's time by kernel category, its idle time, and the
step's wall time, from ``torch.profiler`` around one whole step (forward and backward of every
microbatch, the gradient norm, the optimizer).

The categories are the benchmarks' (:data:`..benchmarks.common.KERNEL_CATEGORIES`: GEMM, cast,
SAT, permutation, attention, optimizer, communication, ...). ``idle`` is the wall time no kernel
ran (the device waiting for the host); the profiler itself slows the host, so read the step's
wall time from the training log, and this record for the split.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, Optional

import torch

from ..benchmarks.common import categorize_kernels

TOP_KERNELS = 15


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(prof, wall_ms: float, step: int) -> Dict[str, object]:
    """The record of one profiled step: {"step", "step_ms", "device_ms_by_category" (idle
    included), "busy_ms", "top_kernels_ms"}, milliseconds rounded to the microsecond."""
    cats, kernels = categorize_kernels(prof)
    busy = sum(cats.values())
    by_cat = {c: round(ms, 3) for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])}
    by_cat["idle"] = round(max(0.0, wall_ms - busy), 3)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"step": step, "step_ms": round(wall_ms, 3), "busy_ms": round(busy, 3), "device_ms_by_category": by_cat,
            "top_kernels_ms": {name[:90]: round(ms, 3) for name, ms in top}}


@contextlib.contextmanager
def profiled_step(step: int, wanted: Optional[int], into: Optional[dict]) -> Iterator[None]:
    """Profile the step when it is the ``wanted`` one (1-based) and ``into`` is a dict: the
    record goes into ``into["step_profile"]``. Any other step runs unprofiled."""
    if wanted is None or into is None or step != wanted:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        _sync()
    into["step_profile"] = summarize(prof, (time.perf_counter() - start) * 1e3, step)


def render(profiles: Dict[str, dict]) -> str:
    """A markdown table: one row per category, one column per run (device ms per step)."""
    names = list(profiles)
    cats: Dict[str, float] = {}
    for p in profiles.values():
        for c, ms in p["device_ms_by_category"].items():
            cats[c] = max(cats.get(c, 0.0), ms)
    order = [c for c in sorted(cats, key=lambda c: -cats[c]) if c != "idle"] + ["idle"]
    lines = ["| device ms per step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for c in order:
        lines.append(f"| {c} | " + " | ".join(f"{profiles[n]['device_ms_by_category'].get(c, 0.0):.2f}" for n in names)
                     + " |")
    lines.append("| step, under the profiler | " + " | ".join(f"{profiles[n]['step_ms']:.2f}" for n in names) + " |")
    return "\n".join(lines)
