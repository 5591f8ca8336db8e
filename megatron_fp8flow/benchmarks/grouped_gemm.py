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


def _stacked_weights(n: int, k: int, experts: int, device):
    """FP8 weights quantized into one stacked buffer, as the expert module keeps them."""
    data = torch.empty(experts, n, k, dtype=fp8.FP8_DTYPE, device=device)
    scale = torch.empty(experts, n // 128, k // 128, dtype=torch.float32, device=device)
    return [fp8.quantize_weight(torch.randn(n, k, device=device) * 0.02, out=(data[i], scale[i]))
            for i in range(experts)]


def _products(experts: int, device):
    sizes = group_sizes(experts, "balanced")
    m = sum(sizes)
    x = fp8.quantize(torch.randn(m, HIDDEN, device=device, dtype=torch.bfloat16))
    w1 = _stacked_weights(2 * FFN, HIDDEN, experts, device)
    dy = fp8.quantize(torch.randn(m, 2 * FFN, device=device, dtype=torch.bfloat16))
    dy_col = fp8.scaling_aware_transpose(dy, sizes)
    x_col = fp8.scaling_aware_transpose(x, sizes)
    # cuBLAS needs the transposed weight copies for dgrad (made once per step, not timed here);
    # Triton reads the forward weights transposed in place.
    w1_t = [w.t() for w in w1]

    def dgrad(be):
        if be == "cublas":
            return gemm.grouped_rowwise_gemm(dy, w1_t, sizes, backend=be)
        return gemm.grouped_rowwise_gemm(dy, w1, sizes, backend=be, transpose_weights=True)

    flops = 2 * m * HIDDEN * 2 * FFN
    return sizes, [
        ("fc1 fprop", m, 2 * FFN, HIDDEN, flops, lambda be: gemm.grouped_rowwise_gemm(x, w1, sizes, backend=be)),
        ("fc1 dgrad", m, HIDDEN, 2 * FFN, flops, dgrad),
        ("fc1 wgrad", 2 * FFN, HIDDEN, m, flops,
         lambda be: gemm.grouped_wgrad(dy_col, x_col, backend=be, out_dtype=torch.bfloat16)),
    ], (x, w1, dy, dy_col, x_col)


ROWWISE_CONFIGS = [  # (block_n, num_warps, num_stages)
    (128, 8, 3), (128, 8, 4), (128, 4, 3), (128, 4, 4), (64, 4, 4), (256, 8, 3), (256, 8, 2), (128, 8, 2),
]
WGRAD_CONFIGS = [  # (block_n, block_k, num_warps, num_stages)
    (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 128, 4, 4), (128, 64, 4, 3), (64, 128, 4, 4),
    (128, 256, 8, 3), (128, 128, 8, 2),
]


def _sweep_rows(experts: int, operands, device) -> list:
    """Time the Triton kernels' launch configurations on one expert count (after a bound check
    against cuBLAS, which must agree to bf16 rounding)."""
    from ..kernels import grouped_gemm as kern

    x, w1, dy, dy_col, x_col = operands
    sizes = group_sizes(experts, "balanced")
    m = sum(sizes)
    groups = x_col.groups
    w_data, w_scale = gemm.stacked_view_or_copy([w.data for w in w1]), gemm.stacked_view_or_copy(
        [w.scale_inv for w in w1])
    flops = 2 * m * HIDDEN * 2 * FFN
    rows = []
    for name, a, wd, ws, n, k in (("fc1 fprop", x, w_data, w_scale, 2 * FFN, HIDDEN),
                                  ("fc1 dgrad", dy, w_data.transpose(1, 2), w_scale.transpose(1, 2), HIDDEN, 2 * FFN)):
        ref = kern.grouped_rowwise_gemm(a.data, a.scale_inv, wd, ws, groups, torch.empty(m, n, device=device,
                                        dtype=torch.bfloat16)).float()
        for bn, warps, stages in ROWWISE_CONFIGS:
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)

            def call():
                return kern.grouped_rowwise_gemm(a.data, a.scale_inv, wd, ws, groups, out, block_n=bn,
                                                 num_warps=warps, num_stages=stages)
            try:
                got = call().float()
            except Exception as err:  # a configuration that does not fit (shared memory) is skipped
                print(f"  {name} {bn}/{warps}/{stages}: {type(err).__name__}")
                continue
            if float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) > 1e-2:
                raise AssertionError(f"{name} config {bn}/{warps}/{stages} disagrees with the default")
            ms = bench_ms(call)
            rows.append(GemmRow(name, experts, m, n, k, f"triton n{bn} w{warps} s{stages}", ms,
                                flops / (ms * 1e-3) / 1e12, flops / FP8_BLOCKWISE_FLOPS * 1e3))
    n, k = 2 * FFN, HIDDEN
    ref = None
    for bn, bk, warps, stages in WGRAD_CONFIGS:
        out = torch.empty(len(sizes), n, k, device=device, dtype=torch.bfloat16)

        def call():
            return kern.grouped_wgrad(dy_col.data, dy_col.scale_inv, x_col.data, x_col.scale_inv, groups, out,
                                      accumulate=False, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        try:
            got = call().float()
        except Exception as err:
            print(f"  fc1 wgrad {bn}/{bk}/{warps}/{stages}: {type(err).__name__}")
            continue
        ref = got if ref is None else ref
        if float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) > 1e-2:
            raise AssertionError(f"wgrad config {bn}/{bk}/{warps}/{stages} disagrees with the first")
        ms = bench_ms(call)
        rows.append(GemmRow("fc1 wgrad", experts, n, k, m, f"triton n{bn} k{bk} w{warps} s{stages}", ms,
                            flops / (ms * 1e-3) / 1e12, flops / FP8_BLOCKWISE_FLOPS * 1e3))
    return rows


def run(out_dir: Optional[str] = None, experts_list=(8, 16, 32), sweep: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the grouped GEMM benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    warm_up(device)
    rows = []
    for experts in experts_list:
        _, products, operands = _products(experts, device)
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
        if sweep and experts == experts_list[len(experts_list) // 2]:
            rows += _sweep_rows(experts, operands, device)
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
