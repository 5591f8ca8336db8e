"""Benchmark: one MoE expert block (fc1 -> weighted SwiGLU -> fc2), forward + backward, per mode.

DeepSeek-V3 shapes: hidden 7168, moe_ffn 2048, top-8, 4096 tokens per rank, 8 / 16 / 32 local
experts (EP 32 / 16 / 8 of 256), balanced and skewed routing; groups padded to 16 rows. For each
precision mode: median step time (device events), achieved TFLOP/s, the bytes held between
forward and backward (the block's input included), the peak allocated over the step, the FP8
weight copies kept across microbatches, and the floor
(FLOPs / 1248 TFLOP/s + essential bytes / 4.13 TB/s).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .. import fp8
from ..fp8.activation import FP8Activation
from ..moe import MODES, ExpertPrecision, FP8FlowGroupedMLP
from .common import COPY_BANDWIDTH_FLOOR, FP8_BLOCKWISE_FLOPS, environment, save_result, warm_up

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


def bench_block(mode: str, recompute: bool, experts: int, routing: str, device, hidden=HIDDEN, ffn=FFN,
                reps: int = 10, warmup: int = 3, gemm_backend: str = "auto") -> BlockRow:
    sizes = group_sizes(experts, routing)
    m = sum(sizes)
    cfg = ExpertPrecision(mode=mode, recompute_experts=recompute, gemm_backend=gemm_backend)
    module = FP8FlowGroupedMLP(experts, hidden, ffn, cfg, dtype=torch.bfloat16, device=device)
    x = torch.randn(m, hidden, device=device, dtype=torch.bfloat16)
    probs = torch.rand(m, device=device)
    dout = torch.randn(m, hidden, device=device, dtype=torch.bfloat16)
    # Tokens arrive as the dispatcher delivers them: FP8 for the flow modes (quantized once before
    # the all-to-all, outside this block: one of the flow's two casts), bf16 otherwise. Each call makes a fresh input, so the
    # memory the block keeps for its backward includes it.
    flow_input = mode in ("flow", "flow_double_quant")

    def make_input():
        if flow_input:
            return FP8Activation(fp8.quantize(x), torch.bfloat16, requires_grad=True)
        return x.clone().requires_grad_(True)

    # Likewise the output gradient: the combine's backward sends it as FP8 in the flow modes.
    grad = FP8Activation(fp8.quantize(dout), torch.bfloat16) if flow_input else dout

    def step(first: bool = False, inp=None):
        out = module(make_input() if inp is None else inp, sizes, probs, is_first_microbatch=first)
        out.backward(grad)

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
        start.record()
        t0 = time.perf_counter()
        step(inp=inp)
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = sorted(times)[len(times) // 2]
    flops = 18 * m * hidden * ffn  # fwd 6 M H F, backward twice that
    essential = m * hidden * 2 * 3 + experts * 3 * hidden * ffn * 2 * 2  # x, out, dx; weights + grads
    floor_ms = (flops / FP8_BLOCKWISE_FLOPS + essential / COPY_BANDWIDTH_FLOOR) * 1e3
    return BlockRow(mode, recompute, experts, routing, m, t, flops / (t * 1e-3) / 1e12, held / 1e9, peak / 1e9,
                    _fp8_cache_bytes(module) / 1e9, floor_ms, floor_ms / t, gemm_backend,
                    sorted(host)[len(host) // 2])


def run(out_dir: Optional[str] = None, experts_list=(8, 16, 32), routings=("balanced", "skewed"),
        gemm_backend: str = "auto") -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the expert-block benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    warm_up(device)
    rows = []
    for experts in experts_list:
        for routing in routings:
            for mode in MODES:
                rows.append(bench_block(mode, False, experts, routing, device, gemm_backend=gemm_backend))
            rows.append(bench_block("flow", True, experts, routing, device, gemm_backend=gemm_backend))
    return save_result({**environment(device), "rows": [asdict(r) for r in rows]}, out_dir, "expert_block.json")


def render(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}; hidden {HIDDEN}, moe_ffn {FFN}, top-{TOPK}, {TOKENS} tokens",
        "",
        "| experts | routing | mode | recompute | rows | step ms | host ms | TFLOP/s | held GB | peak GB | "
        "FP8 weights GB | floor ms | floor / time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['experts']} | {r['routing']} | {r['mode']} | {'yes' if r['recompute'] else 'no'} | {r['rows']} | "
            f"{r['step_ms']:.3f} | {r.get('host_ms', 0.0):.2f} | {r['tflops']:.0f} | {r['held_gb']:.2f} | {r['peak_gb']:.2f} | "
            f"{r.get('fp8_weights_gb', 0.0):.2f} | "
            f"{r['floor_ms']:.3f} | {100 * r['of_floor']:.0f}% |"
        )
    return "\n".join(lines)
