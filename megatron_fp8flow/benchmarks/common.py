"""What every GPU benchmark shares: timing, the copy ceiling, the run's environment, results."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch

COPY_BANDWIDTH_FLOOR = 4.13e12  # bytes/s, read + write, measured on the H200
FP8_BLOCKWISE_FLOPS = 1248e12  # blockwise FP8 GEMM through cuBLAS, measured on the H200
PAPER_RESULTS = Path(__file__).parent / "paper_results"


def warm_up(device, seconds: float = 1.0) -> None:
    """Keep the GPU busy until its clocks have left idle (an idle H200 reports 405 MHz), so the
    first shapes of a benchmark are not timed on a cold GPU."""
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)


def paper_rows(name: str) -> Dict[str, Dict[str, str]]:
    """The paper's published operator results (``paper_results/<name>``) by their config string."""
    path = PAPER_RESULTS / name
    if not path.exists():
        return {}
    with open(path) as fh:
        return {row["config"]: row for row in csv.DictReader(fh)}


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of ``fn`` in ms: device events after warm-up, L2 flushed between calls."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_ms(nbytes: int, device) -> float:
    """A device-to-device copy that reads and writes ``nbytes`` in total."""
    half = nbytes // 2
    src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src))


def environment(device) -> dict:
    """GPU and library versions recorded with every result."""
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
    }


def save_result(result: dict, out_dir: Optional[str], name: str) -> dict:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as fh:
            json.dump(result, fh, indent=1)
    return result


KERNEL_CATEGORIES = (  # (category, substrings of lower-cased kernel names), first match wins
    ("communication", ("nccl", "all_to_all", "alltoall", "allreduce", "all_gather", "reduce_scatter")),
    ("attention", ("flash", "attention", "fmha", "sdpa", "softmax_warp")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "l2norm")),
    ("GEMM", ("gemm", "sm90", "cutlass", "nvjet", "gmma", "grouped_mm", "cublas")),
    ("SAT", ("_sat_",)),
    ("cast", ("_quantize", "quant", "_dequantize")),
    ("SwiGLU", ("swiglu",)),
    ("permutation", ("scatter_rows", "gather_sum_rows", "scatter", "gather", "index", "sort", "cumsum", "nonzero")),
    ("router", ("topk", "sigmoid")),
    ("copy/fill", ("copy", "fill", "memset", "memcpy", "cat")),
    ("elementwise", ("elementwise", "reduce", "norm", "mul", "add")),
)


def categorize_kernels(prof) -> Dict[str, Dict[str, float]]:
    """({category: device ms}, {kernel: device ms}) over a torch.profiler run's device kernels."""
    kernels: Dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e3
    cats: Dict[str, float] = {}
    for name, ms in kernels.items():
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name.lower() for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    return cats, kernels


def relative_paths(text: str) -> str:
    """A profile's text without this machine's paths: files under site-packages and under this
    package's checkout are named from there (``triton/runtime/jit.py``,
    ``megatron_fp8flow/gemm/deepgemm.py``)."""
    import re

    root = str(Path(__file__).resolve().parents[2]) + os.sep
    return re.sub(r"[^\s(]*[/\\](?:site|dist)-packages[/\\]", "", text.replace(root, ""))
