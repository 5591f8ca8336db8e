"""Benchmark: scaling-aware transpose and row-wise quantization on the paper's shapes (GPU).

For each shape (M tokens after expansion, K hidden) with per-expert group sizes jittered the
way a router spreads tokens, times in one process, with device events after warm-up
(``triton.testing.do_bench``, median, L2 flushed between calls):

* ``sat``: our SAT (column variant; tile variant alongside);
* ``dq+rowcol``: the paper's baseline built from our own fastest kernels: dequantize to bf16,
  then row-wise + column-wise quantize (``quantize_grouped(write_rowwise=True)``, which picks
  the fastest kernels for it);
* ``dq+col``: dequantize then column-wise quantize only (a stricter baseline);
* ``copy``: a device-to-device copy moving the same number of bytes as SAT;
* ``rowwise quantize`` of a bf16 [M, K] tensor, and a copy of the same bytes.

Speedups are ratios of times measured side by side; bandwidth fractions are against the copy.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import fp8
from .common import COPY_BANDWIDTH_FLOOR, bench_ms, copy_ms, environment, save_result, warm_up

# (M, K, experts in the model) from the paper's operator benchmarks: M = 4096 tokens x top-k.
PAPER_SHAPES = [
    (28672, 1280, 64),
    (24576, 2048, 64),
    (24576, 5120, 160),
    (32768, 7168, 256),
    (32768, 8192, 384),
    (32768, 9216, 512),
]
PAPER_CSV = "op_scaling_aware_transpose.csv"


def jittered_splits(m: int, groups: int, align: int = 16, jitter: float = 0.5, seed: int = 0) -> list:
    """Group sizes summing to ``m``: each ~ m/groups * U(1 - jitter, 1 + jitter), multiples of ``align``."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + jitter * (2.0 * torch.rand(groups, generator=g) - 1.0)
    raw = (w / w.sum() * (m // align)).floor().long() * align
    raw[-1] += m - int(raw.sum())
    return [int(v) for v in raw]


@dataclass
class SatRow:
    m: int
    k: int
    groups: int
    sat_ms: float
    sat_tile_ms: float
    dq_rowcol_ms: float
    dq_col_ms: float
    copy_ms: float
    sat_bytes: int
    speedup_vs_rowcol: float
    speedup_vs_col: float
    sat_bw_tbs: float
    copy_bw_tbs: float
    sat_frac_of_copy: float
    floor_ms: float
    paper_naive_ms: Optional[float] = None
    paper_sat_ms: Optional[float] = None
    paper_speedup: Optional[float] = None


@dataclass
class QuantRow:
    m: int
    k: int
    quant_ms: float
    copy_ms: float
    quant_bytes: int
    quant_bw_tbs: float
    frac_of_copy: float
    floor_ms: float


def _load_paper(reference_dir: Optional[Path]) -> dict:
    if reference_dir is None or not (reference_dir / PAPER_CSV).exists():
        return {}
    out = {}
    with open(reference_dir / PAPER_CSV) as f:
        for row in csv.DictReader(f):
            m, k = (int(v) for v in row["config"].strip("()").split(","))
            out[(m, k)] = (float(row["naive_ms"]), float(row["scaling_aware_transpose_ms"]), float(row["speedup"]))
    return out


def bench_sat(m: int, k: int, experts: int, ep: int, device, paper: dict) -> SatRow:
    from ..kernels.dequantize import dequantize_rowwise
    from ..kernels.quantize import quantize_grouped
    from ..kernels.scaling_aware_transpose import scaling_aware_transpose as sat_kernel

    splits = jittered_splits(m, max(1, experts // ep), seed=m + k)
    x = torch.randn(m, k, device=device) * torch.exp(torch.randn(m, 1, device=device))
    q = fp8.quantize(x.bfloat16())
    groups = fp8.GroupSplits.build(splits, m, device)

    sat = lambda: sat_kernel(q.data, q.scale_inv, groups)  # noqa: E731
    sat_tile = lambda: sat_kernel(q.data, q.scale_inv, groups, tile_scale=True)  # noqa: E731

    def dq_rowcol():
        xb = dequantize_rowwise(q.data, q.scale_inv, torch.bfloat16)
        return quantize_grouped(xb, groups, write_rowwise=True)

    def dq_col():
        xb = dequantize_rowwise(q.data, q.scale_inv, torch.bfloat16)
        return quantize_grouped(xb, groups, write_rowwise=False)

    # Check before timing: SAT == dequantize + column quantize, bit for bit.
    d_sat, s_sat = sat()
    _, _, d_ref, s_ref = quantize_grouped(dequantize_rowwise(q.data, q.scale_inv, torch.float32), groups, write_rowwise=False)
    if not (torch.equal(d_sat.view(torch.uint8), d_ref.view(torch.uint8)) and torch.equal(s_sat, s_ref)):
        raise AssertionError(f"SAT output differs from dequantize+requantize at shape {(m, k)}")

    nblocks = groups.scale_rows_capacity
    sat_bytes = 2 * m * k + m * math.ceil(k / 128) * 4 + nblocks * k * 4
    t_sat, t_tile = bench_ms(sat), bench_ms(sat_tile)
    t_rowcol, t_col = bench_ms(dq_rowcol), bench_ms(dq_col)
    t_copy = copy_ms(sat_bytes, device)
    sat_bw = sat_bytes / (t_sat * 1e-3) / 1e12
    copy_bw = (sat_bytes // 2 * 2) / (t_copy * 1e-3) / 1e12
    p = paper.get((m, k), (None, None, None))
    return SatRow(
        m, k, len(splits), t_sat, t_tile, t_rowcol, t_col, t_copy, sat_bytes,
        t_rowcol / t_sat, t_col / t_sat, sat_bw, copy_bw, sat_bw / copy_bw,
        sat_bytes / COPY_BANDWIDTH_FLOOR * 1e3, *p,
    )


def bench_rowwise(m: int, k: int, device) -> QuantRow:
    from ..kernels.quantize import quantize_rowwise

    x = (torch.randn(m, k, device=device) * torch.exp(torch.randn(m, 1, device=device))).bfloat16()
    nbytes = 2 * m * k + m * k + m * math.ceil(k / 128) * 4
    t = bench_ms(lambda: quantize_rowwise(x))
    t_copy = copy_ms(nbytes, device)
    bw = nbytes / (t * 1e-3) / 1e12
    copy_bw = (nbytes // 2 * 2) / (t_copy * 1e-3) / 1e12
    return QuantRow(m, k, t, t_copy, nbytes, bw, bw / copy_bw, nbytes / COPY_BANDWIDTH_FLOOR * 1e3)


def sweep_configs(m: int, k: int, experts: int, ep: int, device) -> list:
    """Time kernel launch configurations at one shape (used to choose the defaults)."""
    from ..kernels.quantize import quantize_grouped
    from ..kernels.scaling_aware_transpose import scaling_aware_transpose as sat_kernel

    splits = jittered_splits(m, max(1, experts // ep), seed=m + k)
    x = (torch.randn(m, k, device=device) * torch.exp(torch.randn(m, 1, device=device))).bfloat16()
    q = fp8.quantize(x)
    groups = fp8.GroupSplits.build(splits, m, device)
    shape = f"{m}x{k}"
    rows = []
    for block_k in (64, 128):
        for warps in (2, 4, 8):
            cfg = f"block_k={block_k} warps={warps}"
            t = bench_ms(lambda: sat_kernel(q.data, q.scale_inv, groups, block_k=block_k, num_warps=warps, packed=True))
            rows.append((shape, "sat column, packed words", cfg, t))
            t = bench_ms(lambda: sat_kernel(q.data, q.scale_inv, groups, block_k=block_k, num_warps=warps,
                                            packed=False, chunks=1))
            rows.append((shape, "sat column, words", cfg, t))
    for block_k, warps in ((64, 4), (128, 4)):
        t = bench_ms(lambda: quantize_grouped(x, groups, write_rowwise=False, block_k=block_k, chunks=1, num_warps=warps))
        rows.append((shape, "col quantize", f"block_k={block_k} warps={warps}", t))
    t = bench_ms(lambda: quantize_grouped(x, groups, write_rowwise=True, chunks=1, num_warps=4))
    rows.append((shape, "row+col quantize", "block_k=128 warps=4", t))
    return rows


def run(ep: int = 8, reference_dir: Optional[str] = None, out_dir: Optional[str] = None,
        sweep: bool = False, shapes=None) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the SAT/quantize benchmark needs a CUDA GPU (it measures GPU kernels)")
    device = torch.device("cuda")
    warm_up(device)
    torch.manual_seed(0)
    from . import PAPER_RESULTS

    paper = _load_paper(Path(reference_dir) if reference_dir else PAPER_RESULTS)
    shapes = shapes or PAPER_SHAPES
    result = {
        **environment(device),
        "ep": ep,
        "sat": [asdict(bench_sat(m, k, e, ep, device, paper)) for m, k, e in shapes],
        "rowwise": [asdict(bench_rowwise(m, k, device)) for m, k, _ in shapes],
    }
    if sweep:
        result["sweep"] = []
        for m, k, e in (shapes[0], shapes[-3] if len(shapes) > 2 else shapes[-1]):
            result["sweep"] += sweep_configs(m, k, e, ep, device)
    return save_result(result, out_dir, "sat_quantize.json")


def render(result: dict) -> str:
    """Markdown tables of a :func:`run` result."""
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}, triton {result['triton']}, "
        f"local experts = experts / EP{result['ep']}",
        "",
        "| M x K | groups | SAT ms | SAT tile ms | DQ+row/col ms | DQ+col ms | speedup vs DQ+row/col | "
        "vs DQ+col | SAT TB/s | copy TB/s | SAT / copy | floor ms | paper naive / SAT ms (speedup) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["sat"]:
        paper = "-"
        if r["paper_sat_ms"] is not None:
            paper = f"{r['paper_naive_ms']:.3f} / {r['paper_sat_ms']:.3f} ({r['paper_speedup']:.2f}x)"
        lines.append(
            f"| {r['m']} x {r['k']} | {r['groups']} | {r['sat_ms']:.4f} | {r['sat_tile_ms']:.4f} | "
            f"{r['dq_rowcol_ms']:.4f} | {r['dq_col_ms']:.4f} | {r['speedup_vs_rowcol']:.2f}x | "
            f"{r['speedup_vs_col']:.2f}x | {r['sat_bw_tbs']:.2f} | {r['copy_bw_tbs']:.2f} | "
            f"{100 * r['sat_frac_of_copy']:.0f}% | {r['floor_ms']:.4f} | {paper} |"
        )
    lines += [
        "",
        "| M x K (bf16 in) | row-wise quantize ms | TB/s | copy ms (same bytes) | quantize / copy | floor ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rowwise"]:
        lines.append(
            f"| {r['m']} x {r['k']} | {r['quant_ms']:.4f} | {r['quant_bw_tbs']:.2f} | {r['copy_ms']:.4f} | "
            f"{100 * r['frac_of_copy']:.0f}% | {r['floor_ms']:.4f} |"
        )
    if "sweep" in result:
        lines += ["", "| shape | kernel | config | ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} | {d:.4f} |" for a, b, c, d in result["sweep"]]
    return "\n".join(lines)
