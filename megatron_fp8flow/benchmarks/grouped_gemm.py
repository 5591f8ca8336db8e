"""Benchmark: the grouped GEMMs of the expert MLP, per backend, FP8 and the bf16 baselines (GPU).

DeepSeek-V3 expert shapes (hidden 7168, moe_ffn 2048, 4096 tokens x top-8 per rank) over 8, 16
and 32 local experts, balanced routing, groups padded to 128 rows (DeepGEMM's contiguous
layout). fc1 and fc2, each as fprop, dgrad and wgrad; the wgrad under both gradient contracts:
``param`` (written once in bf16) and ``main_grad`` (added into fp32 main gradients; the floor
then counts their read and write). Each row times one product over all groups with device
events, reports the host time of one call (what a per-group loop pays), and is checked against
the emulation (or the first backend) before timing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .. import fp8, gemm
from ..gemm import bf16 as bf16_gemm
from ..gemm import deepgemm
from .common import COPY_BANDWIDTH_FLOOR, FP8_BLOCKWISE_FLOPS, bench_ms, environment, save_result, warm_up
from .expert_block import FFN, HIDDEN, group_sizes

BACKENDS = ("deepgemm", "cublas", "triton")


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
    host_ms: float = 0.0
    wgrad_into: str = ""  # wgrad rows: "param" or "main_grad"


def _stacked_weights(n: int, k: int, experts: int, device):
    """FP8 weights quantized into one stacked buffer, as the expert module keeps them."""
    data = torch.empty(experts, n, k, dtype=fp8.FP8_DTYPE, device=device)
    scale = torch.empty(experts, n // 128, k // 128, dtype=torch.float32, device=device)
    return [fp8.quantize_weight(torch.randn(n, k, device=device) * 0.02, out=(data[i], scale[i]))
            for i in range(experts)]


def _host_ms(call, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.norm(a - b) / (torch.linalg.norm(b) + 1e-30))


def _linear_rows(name: str, n: int, k: int, experts: int, device, backends) -> list:
    """fprop [M, k] x [n, k]^T, dgrad [M, n] x [n, k], wgrad [n, k] over tokens, for one linear."""
    sizes = group_sizes(experts, "balanced", 128)
    m = sum(sizes)
    flops = 2 * m * n * k
    groups = fp8.GroupSplits.build(sizes, m, device)
    xb = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    gb = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    x, g = fp8.quantize(xb), fp8.quantize(gb)
    ws = _stacked_weights(n, k, experts, device)
    ws_t = [w.t() for w in ws]  # exact transposed copies (made once per step in training)
    cols = {st: (fp8.scaling_aware_transpose(g, sizes, storage=st), fp8.scaling_aware_transpose(x, sizes, storage=st))
            for st in ("side_by_side", "per_group")}
    main = torch.zeros(experts, n, k, device=device)
    rows = []

    def add(product, backend, call, ref=None, into="", extra_bytes=0):
        out = call()
        if ref is not None:
            pairs = zip(out if isinstance(out, list) else [out], ref if isinstance(ref, list) else [ref])
            rel = max(_rel(o, r) for o, r in pairs)
            if rel > 2e-2:
                raise AssertionError(f"{name} {product} {backend}, {experts} experts: off by {rel:.3g}")
        ms = bench_ms(call)
        floor = (flops / FP8_BLOCKWISE_FLOPS + extra_bytes / COPY_BANDWIDTH_FLOOR) * 1e3
        rows.append(GemmRow(f"{name} {product}", experts, m, n, k, backend, ms, flops / (ms * 1e-3) / 1e12, floor,
                            _host_ms(call), into))
        return out

    ref_f = gemm.grouped_rowwise_gemm(x, ws, sizes, backend="cublas")
    ref_d = gemm.grouped_rowwise_gemm(g, ws_t, sizes, backend="cublas")
    ref_w = gemm.grouped_wgrad(*cols["side_by_side"], backend="cublas", out_dtype=torch.bfloat16)
    for be in backends:
        st = "per_group" if be == "deepgemm" else "side_by_side"
        add("fprop", be, lambda: gemm.grouped_rowwise_gemm(x, ws, sizes, backend=be), ref_f)
        if be == "triton":
            add("dgrad", be, lambda: gemm.grouped_rowwise_gemm(g, ws, sizes, backend=be, transpose_weights=True), ref_d)
        else:
            add("dgrad", be, lambda: gemm.grouped_rowwise_gemm(g, ws_t, sizes, backend=be), ref_d)
        add("wgrad", be, lambda: gemm.grouped_wgrad(*cols[st], backend=be, out_dtype=torch.bfloat16), ref_w, "param")
    # Weight-gradient candidates accumulating into fp32 main_grad (read + written: 8 bytes/element).
    acc_bytes = experts * n * k * 8
    if "deepgemm" in backends:
        for method in ("k_grouped", "dense", "cublas"):
            impl = deepgemm.DeepGemmBackend(wgrad_method=method)
            st = "side_by_side" if method == "cublas" else "per_group"
            add("wgrad", f"deepgemm {method}",
                lambda: impl.wgrad(*cols[st], cols[st][0].groups, list(main.unbind(0)), torch.float32),
                into="main_grad", extra_bytes=acc_bytes)
            add("wgrad", f"deepgemm {method}",
                lambda: impl.wgrad(*cols[st], cols[st][0].groups, None, torch.bfloat16), ref_w, into="param")
    add("wgrad", "cublas", lambda: gemm.grouped_wgrad(*cols["side_by_side"], accumulate_into=list(main.unbind(0)),
                                                      backend="cublas"), into="main_grad", extra_bytes=acc_bytes)
    # The bf16 baselines under the same contracts.
    w_b = torch.stack([w.dequantize(torch.bfloat16) for w in ws])
    engines = ["torch"] + (["deepgemm"] if "deepgemm" in backends else [])
    bref_f = bf16_gemm.grouped_mm(xb, w_b, groups, "torch")
    bref_d = bf16_gemm.grouped_mm(gb, w_b, groups, "torch", transpose=False)
    for eng in engines:
        add("fprop", f"bf16 {eng}", lambda: bf16_gemm.grouped_mm(xb, w_b, groups, eng), bref_f)
        add("dgrad", f"bf16 {eng}", lambda: bf16_gemm.grouped_mm(gb, w_b, groups, eng, transpose=False), bref_d)
        like = list(w_b.unbind(0))
        if eng == "torch":
            add("wgrad", "bf16 torch", lambda: bf16_gemm.grouped_wgrad(gb, xb, groups, eng, None, like), into="param")
        add("wgrad", f"bf16 {eng}", lambda: bf16_gemm.grouped_wgrad(gb, xb, groups, eng, list(main.unbind(0)), like),
            into="main_grad", extra_bytes=acc_bytes)
    return rows


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


def run(out_dir: Optional[str] = None, experts_list=(8, 16, 32), sweep: bool = False,
        backends=None) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the grouped GEMM benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    warm_up(device)
    if backends is None:
        backends = tuple(b for b in BACKENDS if b != "deepgemm" or deepgemm.available())
    rows = []
    for experts in experts_list:
        rows += _linear_rows("fc1", 2 * FFN, HIDDEN, experts, device, backends)
        rows += _linear_rows("fc2", HIDDEN, FFN, experts, device, backends)
        if sweep and experts == experts_list[len(experts_list) // 2]:
            rows += _sweep_rows(experts, _sweep_operands(experts, device), device)
    return save_result({**environment(device), "rows": [asdict(r) for r in rows]}, out_dir, "grouped_gemm.json")


def _sweep_operands(experts: int, device):
    sizes = group_sizes(experts, "balanced")
    m = sum(sizes)
    x = fp8.quantize(torch.randn(m, HIDDEN, device=device, dtype=torch.bfloat16))
    w1 = _stacked_weights(2 * FFN, HIDDEN, experts, device)
    dy = fp8.quantize(torch.randn(m, 2 * FFN, device=device, dtype=torch.bfloat16))
    return x, w1, dy, fp8.scaling_aware_transpose(dy, sizes), fp8.scaling_aware_transpose(x, sizes)


def render(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}; DeepSeek-V3 experts (hidden {HIDDEN}, moe_ffn {FFN})",
        "",
        "| product | experts | M x N x K | backend | wgrad into | ms | TFLOP/s | host ms | floor ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['product']} | {r['experts']} | {r['m']} x {r['n']} x {r['k']} | {r['backend']} | "
                     f"{r.get('wgrad_into') or '-'} | {r['ms']:.3f} | {r['tflops']:.0f} | {r.get('host_ms', 0.0):.2f} | "
                     f"{r['floor_ms']:.3f} |")
    return "\n".join(lines)
