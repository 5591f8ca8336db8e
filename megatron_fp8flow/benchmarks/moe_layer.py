"""Benchmark: one whole MoE layer (router to combine), forward + backward, per mode.

DeepSeek-V3 layer shapes per GPU: hidden 7168, moe_ffn 2048, top-8, 32 local experts (the
EP8 slice of 256), a 2048-wide shared expert, sigmoid router with expert bias and group-limited
routing, 4096 tokens per GPU. With N GPUs (torchrun, one process each) the layer has 32 x N
experts at EP = N. Modes: ``stock`` (Megatron's MoELayer with SequentialMLP, the path a run
without TransformerEngine has), and the plugin's ``bf16``, ``blockwise`` and ``flow``.

Per mode: median step time (device events around forward + backward, after warm-up; the maximum
over ranks; with ``microbatches`` N, a step is N forwards and backwards into the same gradients,
as under Megatron's gradient accumulation, and the plugin's FP8 modes quantize their weights once
per step, ``cache_fp8_weights``), the host time to issue a step, the memory kept from the forward for the backward and
the peak allocated during a step (above the weights and gradient buffers). Weight gradients go
where training puts them: into Megatron DDP's fp32 main_grad (``--grads param``: per-parameter
``.grad``, no DDP).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .common import categorize_kernels, environment, save_result

MODES = ("stock", "bf16", "blockwise", "flow")
CONTRACTS = ("main_grad", "main_grad_stacked", "param")


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
    host_ms: float = 0.0  # CPU time to issue one step (the one host sync per layer included)
    grads: str = "main_grad"  # where the weight gradients go (see run)
    held_gb: float = 0.0  # kept from the forward for the backward (the output excluded)
    microbatches: int = 1  # forwards and backwards per step


def _layer(mode: str, cfg, fused: bool = False, cache_fp8_weights: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ..megatron import FP8FlowSettings, apply_fp8flow_to_spec
    from ..megatron.compat import build_from_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False).submodules.mlp
    if mode != "stock":
        backend = "auto" if torch.cuda.is_available() else "emulated"
        spec = apply_fp8flow_to_spec(spec, FP8FlowSettings(mode=mode, gemm_backend=backend,
                                                            gradient_accumulation_fusion=fused,
                                                            cache_fp8_weights=cache_fp8_weights))
    layer = build_from_spec(spec, config=cfg)
    return layer.to(torch.cuda.current_device()) if torch.cuda.is_available() else layer


def with_main_grads(layer, cfg, stacked: bool = False, distributed_optimizer: bool = False):
    """(module to call, zero_grads): the layer under Megatron's own DistributedDataParallel on a
    GPU (fp32 gradient buffers, its hooks, its layout: reverse parameter order, so one expert's
    fc1 and fc2 gradients alternate), or :class:`~..megatron.main_grad.MainGrads` (the same
    contract, each linear's expert gradients stacked) when ``stacked`` or on a CPU, where
    Megatron's DDP cannot allocate its buffers. ``distributed_optimizer``: DDP as the distributed
    optimizer configures it, which also moves the parameters into one buffer (so a linear's
    expert weights lie at one stride and are quantized in one launch)."""
    if torch.cuda.is_available() and not stacked:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=distributed_optimizer)
        ddp = DistributedDataParallel(cfg, ddp_config, layer)
        return ddp, ddp.zero_grad_buffer
    from ..megatron.main_grad import MainGrads

    grads = MainGrads(layer)
    return layer, grads.zero


def run(out_dir: Optional[str] = None, hidden: int = 7168, moe_ffn: int = 2048, local_experts: int = 32,
        topk: int = 8, tokens: int = 4096, modes=MODES, reps: int = 10, warmup: int = 3,
        grads: str = "main_grad", distributed_optimizer: bool = False, microbatches: int = 1) -> Optional[dict]:
    """Time forward + backward of one MoE layer per mode. ``grads``: ``main_grad`` (as in
    training: the layer runs under Megatron's DDP; the plugin's experts add their weight
    gradients into the fp32 main_grad inside the GEMMs, every other weight, the stock
    layer's experts included, gets a bf16 .grad that DDP's hook adds into main_grad: stock
    Megatron fuses that only with apex), ``main_grad_stacked`` (the same contract with each
    linear's expert gradients in one [G, N, K] buffer, as the compact loop lays them out: the
    single-launch k-grouped wgrads can then accumulate) or ``param`` (every weight gets a
    .grad, no DDP). ``microbatches``: forwards and backwards per step, each of ``tokens`` other
    tokens, the first marked as Megatron's schedules mark it."""
    from ..megatron import small_model as sm

    if grads not in CONTRACTS:
        raise ValueError(f"grads must be one of {CONTRACTS}, got {grads!r}")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
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
    xs = [torch.randn(tokens, 1, hidden, generator=g).to(dev, torch.bfloat16) for _ in range(microbatches)]
    x = xs[0]
    dout = torch.randn(tokens, 1, hidden, generator=g).to(dev, torch.bfloat16)
    rows = []
    for mode in modes:
        layer = _layer(mode, cfg, fused=grads != "param", cache_fp8_weights=microbatches > 1)
        module, zero = ((layer, lambda: None) if grads == "param"
                        else with_main_grads(layer, cfg, stacked=grads == "main_grad_stacked",
                                             distributed_optimizer=distributed_optimizer))

        def step():
            for i, xi in enumerate(xs):
                if i == 0 and microbatches > 1:
                    layer.set_is_first_microbatch()  # the FP8 weights are quantized here, once per step
                out, _ = module(xi.detach().requires_grad_(True))
                out.backward(dout)

        for _ in range(warmup):
            step()
        zero()
        held = 0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out, _ = module(x.detach().requires_grad_(True))
            held = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
            out.backward(dout)
            del out
        times, host = [], []
        for _ in range(reps):
            if dist.is_initialized():
                dist.barrier()
            if grads == "param":
                layer.zero_grad(set_to_none=True)  # each step writes its gradients once
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                step()
                host.append((time.perf_counter() - t0) * 1e3)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
                host.append(times[-1])
        t = torch.tensor(sorted(times)[len(times) // 2], device=dev)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else 0.0
        rows.append(LayerRow(mode, world, experts, tokens, float(t), peak, host_ms=sorted(host)[len(host) // 2],
                             grads=grads, held_gb=held / 1e9, microbatches=microbatches))
        layer = module = zero = step = None  # free the weights before the next mode
        if cuda:
            torch.cuda.empty_cache()
    by_mode = {r.mode: r.step_ms for r in rows}
    for r in rows:
        r.vs_stock = by_mode.get("stock", 0.0) / r.step_ms
        r.vs_bf16 = by_mode.get("bf16", 0.0) / r.step_ms
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    env = environment(dev) if cuda else {"gpu": "CPU", "torch": torch.__version__, "triton": ""}
    shapes = {"hidden": hidden, "moe_ffn": moe_ffn, "topk": topk, "shared_ffn": moe_ffn}
    suffix = (("" if grads == "main_grad" else f"_{grads}") + ("_distopt" if distributed_optimizer else "")
              + (f"_mb{microbatches}" if microbatches > 1 else ""))
    return save_result({**env, "shapes": shapes, "ddp_distributed_optimizer": distributed_optimizer,
                        "rows": [asdict(r) for r in rows]}, out_dir,
                       f"moe_layer_{world}gpu{suffix}.json")


def breakdown(mode: str, hidden: int = 7168, moe_ffn: int = 2048, local_experts: int = 32, topk: int = 8,
              tokens: int = 4096, grads: str = "main_grad", top: int = 15) -> dict:
    """Where one layer step of ``mode`` goes (one GPU): device time by kernel category and the
    top kernels (torch.profiler, three steps after warm-up, per step), idle device time, and the
    host time to issue a step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ..megatron import small_model as sm

    shape = sm.SmallMoE(num_layers=1, hidden=hidden, heads=max(1, hidden // 128), ffn=4 * hidden,
                        experts=local_experts, topk=topk, moe_ffn=moe_ffn, shared_ffn=moe_ffn, groups=8,
                        group_topk=4, mtp_layers=0)
    cfg = sm.config(shape)
    layer = _layer(mode, cfg, fused=grads != "param")
    module, _ = ((layer, None) if grads == "param"
                 else with_main_grads(layer, cfg, stacked=grads == "main_grad_stacked"))
    x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)

    def step():
        out, _ = module(x.detach().requires_grad_(True))
        out.backward(dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / 3
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    cats, kernels = categorize_kernels(prof)
    busy = sum(cats.values()) / 3
    per_step = {k: round(v / 3, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    per_step["idle"] = round(max(0.0, step_ms - busy), 3)
    return {"mode": mode, "experts": local_experts, "tokens": tokens, "grads": grads, "step_ms": round(step_ms, 3),
            "host_ms": round(sorted(host)[1], 3), "device_ms_by_category": per_step,
            "top_kernels_ms": {k[:90]: round(v / 3, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]}}


def render_breakdown(parts: list) -> str:
    cats = []
    for p in parts:
        cats += [c for c in p["device_ms_by_category"] if c not in cats]
    lines = ["| category | " + " | ".join(p["mode"] for p in parts) + " |", "| --- |" + " --- |" * len(parts)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{p['device_ms_by_category'].get(c, 0.0):.2f}" for p in parts) + " |")
    lines.append("| step (device events) | " + " | ".join(f"{p['step_ms']:.2f}" for p in parts) + " |")
    lines.append("| host, to issue a step | " + " | ".join(f"{p['host_ms']:.2f}" for p in parts) + " |")
    return "\n".join(lines)


def render(result: dict) -> str:
    rows = result["rows"]
    grads = rows[0].get("grads", "param") if rows else ""
    mb = rows[0].get("microbatches", 1) if rows else 1
    per_step = f"{mb} microbatches per step (FP8 weights quantized once per step)" if mb > 1 else "one per step"
    lines = [f"GPU: {result['gpu']}, torch {result['torch']}; one DeepSeek-V3 MoE layer, forward + backward, "
             f"{per_step}, weight gradients into {grads}", "",
             "| mode | GPUs | experts | tokens/GPU | step ms | host ms | peak GB | held GB | vs stock | vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['gpus']} | {r['experts']} | {r['tokens']} | {r['step_ms']:.2f} | "
                     f"{r.get('host_ms', 0.0):.2f} | {r['peak_gb']:.2f} | {r.get('held_gb', 0.0):.2f} | "
                     f"{r['vs_stock']:.2f}x | {r['vs_bf16']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Entry point: ``torchrun --nproc_per_node N -m megatron_fp8flow.benchmarks.moe_layer [DIR]
    [--grads param] [--breakdown bf16,flow]`` (the breakdown on one process)."""
    import argparse
    import json

    from ..megatron import small_model as sm

    parser = argparse.ArgumentParser(prog="python -m megatron_fp8flow.benchmarks.moe_layer")
    parser.add_argument("out_dir", nargs="?", help="where to write the JSON (default: print only)")
    parser.add_argument("--grads", choices=CONTRACTS, default="main_grad",
                        help="main_grad: Megatron DDP's fp32 buffers (default); main_grad_stacked: the same, each "
                        "linear's expert gradients stacked; param: per-parameter .grad")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="with --grads main_grad: Megatron's DDP as the distributed optimizer sets it up "
                             "(parameters moved into one buffer)")
    parser.add_argument("--microbatches", type=int, default=1, metavar="N",
                        help="forwards and backwards per step, into the same gradients (Megatron's gradient "
                        "accumulation); the FP8 modes then quantize their weights once per step")
    parser.add_argument("--breakdown", metavar="MODES", help="instead of the table: device time by category of "
                        "these modes' steps (comma-separated)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes + (args.breakdown or "").split(",") if m and m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; expected {', '.join(MODES)}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    sm.init_parallel(rank, world, ep=world, port=int(os.environ.get("MASTER_PORT", 29531)))
    if args.breakdown:
        parts = [breakdown(m, grads=args.grads) for m in args.breakdown.split(",")]
        if args.out_dir:
            save_result({**environment(torch.device("cuda")), "parts": parts}, args.out_dir,
                        f"moe_layer_breakdown_{args.grads}.json")
        print(json.dumps([{k: p[k] for k in ("mode", "top_kernels_ms")} for p in parts], indent=1))
        print(render_breakdown(parts))
        return
    if args.microbatches < 1:
        parser.error(f"--microbatches {args.microbatches}: must be >= 1")
    result = run(args.out_dir, modes=modes, grads=args.grads, distributed_optimizer=args.distributed_optimizer,
                 microbatches=args.microbatches)
    if result is not None:
        print(render(result))


if __name__ == "__main__":
    main()
