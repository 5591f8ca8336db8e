"""Benchmark: one whole MoE layer (router to combine), forward + backward, per mode.

DeepSeek-V3 layer shapes per GPU: hidden 7168, moe_ffn 2048, top-8, 32 local experts (the
EP8 slice of 256), a 2048-wide shared expert, sigmoid router with expert bias and group-limited
routing, 4096 tokens per GPU. With N GPUs (torchrun, one process each) the layer has 32 x N
experts at EP = N. Modes: ``stock`` (Megatron's MoELayer with SequentialMLP, the path a run
without TransformerEngine has), and the plugin's ``bf16``, ``blockwise`` and ``flow``.

Per mode: median step time (device events around forward + backward, after warm-up; the maximum
over ranks) and the peak memory allocated during a step.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .common import environment, save_result

MODES = ("stock", "bf16", "blockwise", "flow")


@dataclass
class LayerRow:
    mode: str
    gpus: int
    experts: int
    tokens: int
    step_ms: float
    peak_gb: float
    vs_stock: float = 0.0
    vs_bf16: float = 0.0


def _layer(mode: str, cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ..megatron import FP8FlowSettings, apply_fp8flow_to_spec
    from ..megatron.compat import build_from_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False).submodules.mlp
    if mode != "stock":
        backend = "auto" if torch.cuda.is_available() else "emulated"
        spec = apply_fp8flow_to_spec(spec, FP8FlowSettings(mode=mode, gemm_backend=backend))
    layer = build_from_spec(spec, config=cfg)
    return layer.to(torch.cuda.current_device()) if torch.cuda.is_available() else layer


def run(out_dir: Optional[str] = None, hidden: int = 7168, moe_ffn: int = 2048, local_experts: int = 32,
        topk: int = 8, tokens: int = 4096, modes=MODES, reps: int = 10, warmup: int = 3) -> Optional[dict]:
    from ..megatron import small_model as sm

    world = dist.get_world_size() if dist.is_initialized() else 1
    experts = local_experts * world
    groups = 8 if experts % 8 == 0 and experts >= 16 else 1
    shape = sm.SmallMoE(num_layers=1, hidden=hidden, heads=max(1, hidden // 128), ffn=4 * hidden,
                        experts=experts, topk=topk, moe_ffn=moe_ffn, shared_ffn=moe_ffn, groups=groups,
                        group_topk=max(1, groups // 2), mtp_layers=0)
    cfg = sm.config(shape)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x = torch.randn(tokens, 1, hidden, generator=g).to(dev, torch.bfloat16)
    dout = torch.randn(tokens, 1, hidden, generator=g).to(dev, torch.bfloat16)
    rows = []
    for mode in modes:
        layer = _layer(mode, cfg)

        def step():
            inp = x.detach().requires_grad_(True)
            out, _ = layer(inp)
            out.backward(dout)

        for _ in range(warmup):
            step()
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(reps):
            if dist.is_initialized():
                dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        t = torch.tensor(sorted(times)[len(times) // 2], device=dev)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else 0.0
        rows.append(LayerRow(mode, world, experts, tokens, float(t), peak))
        layer = step = None  # free the weights before the next mode
    by_mode = {r.mode: r.step_ms for r in rows}
    for r in rows:
        r.vs_stock = by_mode.get("stock", 0.0) / r.step_ms
        r.vs_bf16 = by_mode.get("bf16", 0.0) / r.step_ms
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    env = environment(dev) if cuda else {"gpu": "CPU", "torch": torch.__version__, "triton": ""}
    return save_result({**env, "rows": [asdict(r) for r in rows]}, out_dir, f"moe_layer_{world}gpu.json")


def profile(mode: str, hidden: int = 7168, moe_ffn: int = 2048, local_experts: int = 32, topk: int = 8,
            tokens: int = 4096, rows: int = 25) -> str:
    """Where one layer step of ``mode`` spends its time: torch.profiler over three steps after
    warm-up, the top operators by device time, and host time per step beside device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ..megatron import small_model as sm

    shape = sm.SmallMoE(num_layers=1, hidden=hidden, heads=max(1, hidden // 128), ffn=4 * hidden,
                        experts=local_experts, topk=topk, moe_ffn=moe_ffn, shared_ffn=moe_ffn, groups=8,
                        group_topk=4, mtp_layers=0)
    layer = _layer(mode, sm.config(shape))
    x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)

    def step():
        out, _ = layer(x.detach().requires_grad_(True))
        out.backward(dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    host_ms = (time.perf_counter() - t0) * 1e3 / 3  # includes waiting for the device at the end
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / 3
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 3e3
    return (f"{mode}: wall {wall_ms:.2f} ms/step, host returns after {host_ms:.2f} ms, device busy "
            f"{busy:.2f} ms/step\n{table}")


def render(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}, torch {result['torch']}; one DeepSeek-V3 MoE layer, forward + backward", "",
             "| mode | GPUs | experts | tokens/GPU | step ms | peak GB | vs stock | vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['gpus']} | {r['experts']} | {r['tokens']} | {r['step_ms']:.2f} | "
                     f"{r['peak_gb']:.2f} | {r['vs_stock']:.2f}x | {r['vs_bf16']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    """Entry point: ``torchrun --nproc_per_node N -m megatron_fp8flow.benchmarks.moe_layer [DIR]``;
    ``... --profile bf16,flow`` (one process) prints where each mode's step spends its time."""
    import sys

    from ..megatron import small_model as sm

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    sm.init_parallel(rank, world, ep=world, port=int(os.environ.get("MASTER_PORT", 29531)))
    if len(sys.argv) > 2 and sys.argv[1] == "--profile":
        for mode in sys.argv[2].split(","):
            print(profile(mode))
        return
    result = run(sys.argv[1] if len(sys.argv) > 1 else None)
    if result is not None:
        print(render(result))


if __name__ == "__main__":
    main()
