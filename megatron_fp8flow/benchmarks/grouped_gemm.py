"""Benchmark: blockwise FP8 grouped GEMMs, cuBLAS (one ``torch._scaled_mm`` per group) against
the single-launch Triton kernels, for the three products of the expert MLP (GPU).

DeepSeek-V3 expert shapes (hidden 7168, moe_ffn 2048, 4096 tokens x top-8 per rank) over 8, 16
and 32 local experts, balanced routing. Each row times one product over all groups, including
everything the backend does per call on the host (that is what the per-group loop pays), and
checks the two backends agree before timing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .. import fp8, gemm
from .common import FP8_BLOCKWISE_FLOPS, bench_ms, environment, save_result, warm_up
from .expert_block import FFN, HIDDEN, group_sizes

BACKENDS = ("cublas", "triton")


@dataclass
class GemmRow:
    product: str  # "fc1 fprop", ...
    experts: int
    m: int
    n: int
    k: int
    backend: str
    ms: float
    tflops: float
    floor_ms: float


def _products(experts: int, device):
    sizes = group_sizes(experts, "balanced")
    m = sum(sizes)
    x = fp8.quantize(torch.randn(m, HIDDEN, device=device, dtype=torch.bfloat16))
    w1 = [fp8.quantize_weight(torch.randn(2 * FFN, HIDDEN, device=device) * 0.02) for _ in range(experts)]
    dy = fp8.quantize(torch.randn(m, 2 * FFN, device=device, dtype=torch.bfloat16))
    dy_col = fp8.scaling_aware_transpose(dy, sizes)
    x_col = fp8.scaling_aware_transpose(x, sizes)
    w1_t = [w.t() for w in w1]
    flops = 2 * m * HIDDEN * 2 * FFN
    return sizes, [
        ("fc1 fprop", m, 2 * FFN, HIDDEN, flops, lambda be: gemm.grouped_rowwise_gemm(x, w1, sizes, backend=be)),
        ("fc1 dgrad", m, HIDDEN, 2 * FFN, flops, lambda be: gemm.grouped_rowwise_gemm(dy, w1_t, sizes, backend=be)),
        ("fc1 wgrad", 2 * FFN, HIDDEN, m, flops,
         lambda be: gemm.grouped_wgrad(dy_col, x_col, backend=be, out_dtype=torch.bfloat16)),
    ]


def run(out_dir: Optional[str] = None, experts_list=(8, 16, 32)) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the grouped GEMM benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    warm_up(device)
    rows = []
    for experts in experts_list:
        _, products = _products(experts, device)
        for name, m, n, k, flops, call in products:
            ref = call("cublas")
            got = call("triton")
            for r, t in zip(ref if isinstance(ref, list) else [ref], got if isinstance(got, list) else [got]):
                rel = float(torch.linalg.norm(r.float() - t.float()) / (torch.linalg.norm(r.float()) + 1e-30))
                if rel > 1e-2:
                    raise AssertionError(f"{name}, {experts} experts: cuBLAS and Triton differ by {rel:.3g}")
            for be in BACKENDS:
                ms = bench_ms(lambda: call(be))
                rows.append(GemmRow(name, experts, m, n, k, be, ms, flops / (ms * 1e-3) / 1e12,
                                    flops / FP8_BLOCKWISE_FLOPS * 1e3))
    return save_result({**environment(device), "rows": [asdict(r) for r in rows]}, out_dir, "grouped_gemm.json")


def render(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}; DeepSeek-V3 fc1 (hidden {HIDDEN}, 2 x moe_ffn {2 * FFN})",
        "",
        "| product | experts | M x N x K | backend | ms | TFLOP/s | floor ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['product']} | {r['experts']} | {r['m']} x {r['n']} x {r['k']} | {r['backend']} | "
                     f"{r['ms']:.3f} | {r['tflops']:.0f} | {r['floor_ms']:.3f} |")
    return "\n".join(lines)
