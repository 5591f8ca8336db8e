"""Benchmark: one MoE expert block (fc1 -> weighted SwiGLU -> fc2), forward + backward, per mode.

DeepSeek-V3 shapes: hidden 7168, moe_ffn 2048, top-8, 4096 tokens per rank, 8 / 16 / 32 local
experts (EP 32 / 16 / 8 of 256), balanced and skewed routing; groups padded to the GEMM
backend's alignment (128 for DeepGEMM, 16 otherwise; every mode gets the same rows). For each
precision mode and weight-gradient contract (``wgrad_into``: ``param``, written once in the
parameter dtype; ``main_grad``, accumulated into fp32 main gradients by the GEMM, as Megatron
trains): median step time (device events), the host time to issue the step, kernel launches,
achieved TFLOP/s, the bytes held between forward and backward (the block's input included),
the peak allocated over the step, the FP8 weight copies kept across microbatches, and the floor
(FLOPs / 1248 TFLOP/s + essential bytes / 4.13 TB/s; main_grad adds its fp32 read + write).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .. import fp8, gemm
from ..fp8.activation import FP8Activation
from ..moe import MODES, ExpertPrecision, FP8FlowGroupedMLP
from .common import (COPY_BANDWIDTH_FLOOR, FP8_BLOCKWISE_FLOPS, categorize_kernels, environment, relative_paths,
                     save_result, warm_up)

HIDDEN, FFN, TOPK, TOKENS = 7168, 2048, 8, 4096


@dataclass
class BlockRow:
    mode: str
    recompute: bool
    experts: int
    routing: str
    rows: int
    step_ms: float
    tflops: float
    held_gb: float
    peak_gb: float
    fp8_weights_gb: float  # FP8 weight copies kept across the microbatches of a step
    floor_ms: float
    of_floor: float
    gemm_backend: str = "auto"
    host_ms: float = 0.0  # CPU time to issue one step's kernels; near step_ms means host-bound
    wgrad_into: str = "param"  # "param" (one write, parameter dtype) or "main_grad" (fp32, accumulated)
    bf16_gemm: str = ""  # the bf16 mode's engine (torch | deepgemm)
    launches: int = 0  # GPU kernels and copies of one forward + backward


def group_sizes(experts: int, routing: str, align: int = 16, seed: int = 0) -> list:
    """Rows per expert for TOKENS x TOPK copies, padded to ``align``; 'skewed' is Zipf-like."""
    total = TOKENS * TOPK
    if routing == "balanced":
        w = torch.ones(experts)
    else:
        w = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32) ** 1.2
    raw = (w / w.sum() * total).floor().long()
    raw[0] += total - int(raw.sum())
    return [int(-(-v // align) * align) for v in raw]


def _fp8_cache_bytes(module: FP8FlowGroupedMLP) -> int:
    if module._fp8_cache is None:
        return 0
    return sum(q.data.nbytes + q.scale_inv.nbytes for q in module._fp8_cache[1].tensors())


def _count_launches(step) -> int:
    """GPU activities (kernels, copies, fills) of one call of ``step``, from PyTorch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_block(mode: str, recompute: bool, experts: int, routing: str, device, hidden=HIDDEN, ffn=FFN,
                reps: int = 10, warmup: int = 3, gemm_backend: str = "auto", wgrad_into: str = "param",
                bf16_gemm: str = "auto", align: int = 16, _capture=None) -> BlockRow:
    sizes = group_sizes(experts, routing, align)
    m = sum(sizes)
    fused = wgrad_into == "main_grad"
    cfg = ExpertPrecision(mode=mode, recompute_experts=recompute, gemm_backend=gemm_backend,
                          gradient_accumulation_fusion=fused, bf16_gemm=bf16_gemm)
    module = FP8FlowGroupedMLP(experts, hidden, ffn, cfg, dtype=torch.bfloat16, device=device)
    if fused:  # one fp32 buffer per linear, as Megatron's DDP lays out the experts' main gradients
        for lin in (module.linear_fc1, module.linear_fc2):
            ws = lin.weights()
            buf = torch.zeros(len(ws), *ws[0].shape, dtype=torch.float32, device=device)
            for i, w in enumerate(ws):
                w.main_grad = buf[i]
    x = torch.randn(m, hidden, device=device, dtype=torch.bfloat16)
    probs = torch.rand(m, device=device)
    dout = torch.randn(m, hidden, device=device, dtype=torch.bfloat16)
    # Tokens arrive as the dispatcher delivers them: FP8 for the flow modes (quantized once before
    # the all-to-all, outside this block: one of the flow's two casts), bf16 otherwise. Each call makes a fresh input, so the
    # memory the block keeps for its backward includes it.
    flow_input = mode in ("flow", "flow_double_quant")
    # ... with the scale layout the dispatcher's permutation writes for this GEMM backend.
    scales = gemm.layouts(gemm_backend, device).row_scales

    def make_input():
        if flow_input:
            return FP8Activation(fp8.quantize(x, scale_layout=scales), torch.bfloat16, requires_grad=True)
        return x.clone().requires_grad_(True)

    # Likewise the output gradient: the combine's backward sends it as FP8 in the flow modes.
    grad = FP8Activation(fp8.quantize(dout, scale_layout=scales), torch.bfloat16) if flow_input else dout

    def step(first: bool = False, inp=None):
        out = module(make_input() if inp is None else inp, sizes, probs, is_first_microbatch=first)
        out.backward(grad)

    if _capture is not None:
        _capture(step)
    step(first=True)  # the first microbatch of a step quantizes the weights; the timed ones reuse them
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    # Memory held between forward and backward (the input included), and the peak over one step.
    module.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    inp = make_input()
    out = module(inp, sizes, probs, is_first_microbatch=False)
    held = torch.cuda.memory_allocated(device) - before - out.numel() * out.element_size()
    out.backward(grad)
    del inp, out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    times, host = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inp = make_input()  # made by the dispatcher, outside the block: not timed
        module.zero_grad(set_to_none=True)  # "param": each step writes its gradients once
        start.record()
        t0 = time.perf_counter()
        step(inp=inp)
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = sorted(times)[len(times) // 2]
    launches = _count_launches(step)
    flops = 18 * m * hidden * ffn  # fwd 6 M H F, backward twice that
    params = experts * 3 * hidden * ffn
    grads = params * (8 if fused else 2)  # fp32 main_grad read + written, or one bf16 write
    essential = m * hidden * 2 * 3 + params * 2 + grads  # x, out, dx; weights; gradients
    floor_ms = (flops / FP8_BLOCKWISE_FLOPS + essential / COPY_BANDWIDTH_FLOOR) * 1e3
    engine = ""
    if mode == "bf16":
        from ..gemm import bf16

        engine = bf16.resolve_engine(bf16_gemm, device, sizes, into_main_grad=fused)
    return BlockRow(mode, recompute, experts, routing, m, t, flops / (t * 1e-3) / 1e12, held / 1e9, peak / 1e9,
                    _fp8_cache_bytes(module) / 1e9, floor_ms, floor_ms / t,
                    gemm.resolve_backend(gemm_backend, device) if mode != "bf16" else "-",
                    sorted(host)[len(host) // 2], wgrad_into, engine, launches)


def breakdown(mode: str, experts: int, device, wgrad_into: str = "main_grad", bf16_gemm: str = "auto",
              gemm_backend: str = "auto", top: int = 12) -> dict:
    """Where one forward + backward goes: device time by kernel category and the top kernels
    (PyTorch's profiler), and the host functions that cost the most (cProfile)."""
    import cProfile
    import pstats
    from io import StringIO

    from torch.profiler import ProfilerActivity, profile

    align = 128 if mode == "bf16" or gemm.resolve_backend(gemm_backend, device) == "deepgemm" else 16
    holder = {}

    def capture(step):
        holder["step"] = step

    bench_block(mode, False, experts, "balanced", device, reps=2, warmup=2, gemm_backend=gemm_backend,
                wgrad_into=wgrad_into, bf16_gemm=bf16_gemm, align=align, _capture=capture)
    step = holder["step"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    cats, kernels = categorize_kernels(prof)
    torch.cuda.synchronize()
    prof_host = cProfile.Profile()
    prof_host.enable()
    for _ in range(3):
        step()
    prof_host.disable()
    torch.cuda.synchronize()
    text = StringIO()
    pstats.Stats(prof_host, stream=text).sort_stats("tottime").print_stats(top)
    return {"mode": mode, "experts": experts, "wgrad_into": wgrad_into,
            "device_ms_by_category": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k[:90]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]},
            "host_profile_3_steps": relative_paths(text.getvalue())}


def run(out_dir: Optional[str] = None, experts_list=(8, 16, 32), routings=("balanced", "skewed"),
        gemm_backend: str = "auto", contracts=("main_grad", "param"), bf16_engines=("torch", "deepgemm")) -> dict:
    """Every mode under every gradient contract; the bf16 mode once per engine that runs here
    (the strongest is the baseline)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the expert-block benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    warm_up(device)
    align = gemm.layouts(gemm_backend, device).group_alignment
    from ..gemm import deepgemm

    engines = [e for e in bf16_engines if e != "deepgemm" or deepgemm.available()]
    align = max(align, 128 if "deepgemm" in engines else 16)
    rows = []
    for experts in experts_list:
        for routing in routings:
            for into in contracts:
                common = dict(gemm_backend=gemm_backend, wgrad_into=into, align=align)
                for engine in engines:
                    rows.append(bench_block("bf16", False, experts, routing, device, bf16_gemm=engine, **common))
                for mode in MODES[1:]:
                    rows.append(bench_block(mode, False, experts, routing, device, **common))
                rows.append(bench_block("flow", True, experts, routing, device, **common))
    return save_result({**environment(device), "rows": [asdict(r) for r in rows]}, out_dir, "expert_block.json")


def render(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}; hidden {HIDDEN}, moe_ffn {FFN}, top-{TOPK}, {TOKENS} tokens",
        "",
        "| experts | routing | mode | recompute | wgrad into | GEMMs | rows | step ms | host ms | launches | TFLOP/s | "
        "held GB | peak GB | FP8 weights GB | floor ms | floor / time | vs best bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    best = {}
    for r in result["rows"]:
        if r["mode"] == "bf16":
            key = (r["experts"], r["routing"], r.get("wgrad_into", "param"))
            best[key] = min(best.get(key, float("inf")), r["step_ms"])
    for r in result["rows"]:
        into = r.get("wgrad_into", "param")
        base = best.get((r["experts"], r["routing"], into))
        gemms = r.get("bf16_gemm") or r.get("gemm_backend", "")
        lines.append(
            f"| {r['experts']} | {r['routing']} | {r['mode']} | {'yes' if r['recompute'] else 'no'} | {into} | {gemms} | "
            f"{r['rows']} | {r['step_ms']:.3f} | {r.get('host_ms', 0.0):.2f} | {r.get('launches', 0)} | {r['tflops']:.0f} | "
            f"{r['held_gb']:.2f} | {r['peak_gb']:.2f} | {r.get('fp8_weights_gb', 0.0):.2f} | "
            f"{r['floor_ms']:.3f} | {100 * r['of_floor']:.0f}% | {base / r['step_ms'] if base else float('nan'):.2f}x |"
        )
    return "\n".join(lines)
