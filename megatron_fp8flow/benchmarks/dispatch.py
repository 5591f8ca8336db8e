"""Benchmark: FP8 dispatch (bytes + 1x128 scales) against the bf16 all-to-all across the GPUs of
one host, for the paper's communication configurations (tokens, hidden) per rank.

Run under torchrun with one process per GPU. Every rank sends an equal share of its rows to
every rank (balanced routing). Times are medians of device events after warm-up (ten calls per
event pair, after a barrier); the maximum over ranks is reported.

* **bf16 ms**: the all-to-all of bf16 rows.
* **fp8 comm ms**: the all-to-all of FP8 bytes plus fp32 scales (two collectives).
* **quant ms** / **dequant ms**: row-wise quantization before, dequantization after (the flow
  needs only the quantization: the experts consume FP8).
* **comm speedup** = bf16 / fp8 comm; **flow speedup** = bf16 / (quant + fp8 comm).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .. import fp8
from ..ops.comm import all_to_all_rows
from .common import environment, paper_rows, save_result

CONFIGS = ((24576, 2048), (24576, 5120), (32768, 7168))


@dataclass
class DispatchRow:
    tokens: int
    hidden: int
    ranks: int
    bf16_ms: float
    fp8_comm_ms: float
    quant_ms: float
    dequant_ms: float
    comm_speedup: float
    flow_speedup: float
    paper: str


def _time(fn, reps: int = 20, warmup: int = 5, inner: int = 10) -> float:
    """Median ms per call: ``inner`` calls between two events, so the host's launch latency of
    one call is not counted as device time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    t = torch.tensor(sorted(times)[len(times) // 2], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(out_dir: Optional[str] = None) -> Optional[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for tokens, hidden in CONFIGS:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        splits = [tokens // world] * world
        splits[-1] += tokens - sum(splits)
        q = fp8.quantize(x)
        bf16 = _time(lambda: all_to_all_rows(x, splits, splits))
        fp8_comm = _time(lambda: all_to_all_rows(q, splits, splits))
        quant = _time(lambda: fp8.quantize(x))
        dequant = _time(lambda: q.dequantize(torch.bfloat16))
        got = all_to_all_rows(q, splits, splits)
        ref = fp8.quantize(all_to_all_rows(x, splits, splits))  # FP8 sent == quantized after sending
        if not (torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
                and torch.equal(got.scale_inv, ref.scale_inv)):
            raise AssertionError(f"FP8 all-to-all delivered different bytes at {tokens} x {hidden}")
        paper = paper_rows("comm_intranode_ep8.csv").get(f"({tokens},{hidden},8)")
        rows.append(DispatchRow(tokens, hidden, world, bf16, fp8_comm, quant, dequant, bf16 / fp8_comm,
                                bf16 / (quant + fp8_comm),
                                f"{paper['speedup_comm']}x / {paper['speedup_all']}x" if paper else "-"))
    if rank != 0:
        return None
    return save_result({**environment(torch.device("cuda")), "rows": [asdict(r) for r in rows]}, out_dir,
                       f"dispatch_ep{world}.json")


def render(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}, torch {result['torch']}; balanced all-to-all across "
             f"{result['rows'][0]['ranks']} GPUs", "",
             "| tokens x hidden | bf16 ms | fp8 comm ms | quant ms | dequant ms | comm speedup | flow speedup "
             "| paper (EP8) comm / all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['tokens']} x {r['hidden']} | {r['bf16_ms']:.3f} | {r['fp8_comm_ms']:.3f} | "
                     f"{r['quant_ms']:.3f} | {r['dequant_ms']:.3f} | {r['comm_speedup']:.2f}x | "
                     f"{r['flow_speedup']:.2f}x | {r['paper']} |")
    return "\n".join(lines)


def main() -> None:
    """Entry point under torchrun."""
    import sys

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    result = run(sys.argv[1] if len(sys.argv) > 1 else None)
    if result is not None:
        print(render(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
