"""Benchmark: the experts' 128x128 weight quantization per step (GPU), against the copy floor.

One call per linear and direction, as the expert layer makes them: DeepSeek-V3's fc1 [4096,
7168] and fc2 [7168, 2048] of G experts, bf16, in one buffer (the stride path: a stacked
weight or Megatron DDP's parameter buffer) and in allocations of their own (the address-table
path), row-major and transposed. Every strip height / warp count in ``--tunings`` is timed
side by side (device events after warm-up, median, L2 flushed); ``copy`` is a device copy of
the same bytes (bf16 read + FP8 written), the floor.

    python -m megatron_fp8flow.benchmarks.quantize_weight OUT [--experts 32] [--tunings 128x8,64x4,...]
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

from ..fp8.format import BLOCK, FP8_DTYPE, cdiv
from .common import bench_ms, copy_ms, environment, save_result, warm_up

LINEARS = {"fc1": (4096, 7168), "fc2": (7168, 2048)}  # DeepSeek-V3: [2 x moe_ffn, hidden], [hidden, moe_ffn]
DEFAULT_TUNINGS = "128x8,64x4,64x8,32x4,32x8,16x4"


def parse_tunings(text: str) -> List[tuple]:
    out = []
    for item in text.split(","):
        try:
            sub, warps = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--tunings: {item!r} is not STRIPxWARPS (e.g. 64x4)")
        if sub not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8, 16):
            raise SystemExit(f"--tunings: {item!r}: the strip height must be 16, 32, 64 or 128 and the warps "
                             "1, 2, 4, 8 or 16")
        out.append((sub, warps))
    return out


def run(out_dir, experts: int, tunings: List[tuple]) -> dict:
    from ..kernels.quantize_weight import TUNING, quantize_weights

    dev = torch.device("cuda")
    warm_up(dev)
    rows = []
    for name, (n, k) in LINEARS.items():
        stacked = torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16) * 0.02
        layouts = {"one buffer": list(stacked.unbind(0)), "separate": [w.clone() for w in stacked.unbind(0)]}
        nbytes = experts * n * k * 3  # bf16 read, FP8 written (the scales are 1/8192 of it)
        floor = copy_ms(nbytes, dev)
        for transposed in (False, True):
            r, c = (k, n) if transposed else (n, k)
            data = torch.empty(experts, r, c, dtype=FP8_DTYPE, device=dev)
            scale = torch.empty(experts, cdiv(r, BLOCK), cdiv(c, BLOCK), device=dev)
            for layout, ws in layouts.items():
                for tuning in tunings:
                    ms = bench_ms(lambda: quantize_weights(ws, data, scale, True, transposed, tuning=tuning))
                    rows.append({"linear": name, "shape": [experts, n, k], "transposed": transposed, "layout": layout,
                                 "strip": tuning[0], "warps": tuning[1], "ms": ms, "copy_ms": floor,
                                 "of_floor": floor / ms, "default": tuning == TUNING[transposed]})
        del stacked, layouts
    result = {**environment(dev), "experts": experts, "rows": rows}
    save_result(result, out_dir, "quantize_weight.json")
    print(f"GPU: {result['gpu']}, torch {result['torch']}, Triton {result['triton']}; {experts} experts, bf16 weights")
    print("| linear | direction | layout | strip x warps | ms | copy ms | of the floor |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        mark = " (default)" if row["default"] else ""
        print(f"| {row['linear']} | {'transposed' if row['transposed'] else 'row-major'} | {row['layout']} | "
              f"{row['strip']}x{row['warps']}{mark} | {row['ms']:.3f} | {row['copy_ms']:.3f} | {row['of_floor']:.2f} |")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_fp8flow.benchmarks.quantize_weight",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="directory for quantize_weight.json")
    parser.add_argument("--experts", type=int, default=32, help="experts per linear (default 32)")
    parser.add_argument("--tunings", default=DEFAULT_TUNINGS, help=f"STRIPxWARPS list (default {DEFAULT_TUNINGS})")
    args = parser.parse_args(argv)
    tunings = parse_tunings(args.tunings)
    if args.experts < 1:
        parser.error(f"--experts must be at least 1, got {args.experts}")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    run(args.out, args.experts, tunings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
