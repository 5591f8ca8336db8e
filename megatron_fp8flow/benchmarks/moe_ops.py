"""Benchmark: fused MoE data-movement kernels against the unfused path a user has (GPU).

Each fused operator is timed side by side with (a) an efficient unfused baseline built from
our own kernels, one step at a time, and (b) the plain-PyTorch eager path, forward and
backward separately, with the same work on both sides:

* permute+pad (bf16 and FP8): fused scatter vs single-pass permute then a pad copy;
  backward: fused gather-sum vs unpad then unpermute-sum.
* unpad+unpermute (bf16 rows): fused gather-sum vs unpad copy then unpermute-sum; backward
  (bf16 and FP8 gradient): fused scatter vs unpermute-scatter then pad copy.
* weighted SwiGLU + quantize: fused kernel vs fused bf16 SwiGLU then our row-wise quantize;
  backward: fused vs bf16 SwiGLU backward then row-wise quantize of [d_gate | d_up].

Bytes each fused kernel must move are counted and printed with the achieved bandwidth and
its fraction of a device copy of the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .. import fp8, ops
from ..kernels.gather_rows import gather_sum_rows
from ..kernels.scatter_rows import scatter_rows
from ..kernels.swiglu_quant import swiglu_quant_backward, swiglu_quant_forward
from . import common
from .common import COPY_BANDWIDTH_FLOOR, environment, save_result

PERMUTE_SHAPES = [(64, 1280, 7), (64, 2048, 6), (160, 5120, 6), (256, 7168, 8), (384, 8192, 8), (512, 9216, 8)]
SWIGLU_SHAPES = [(1280, 64, 7, 1024), (2048, 64, 6, 1408), (5120, 160, 6, 1536), (7168, 256, 8, 2048)]
TOKENS = 4096


@dataclass
class OpRow:
    op: str
    shape: str
    direction: str
    fused_ms: float
    baseline_ms: float
    eager_ms: float
    speedup: float
    speedup_vs_eager: float
    fused_bytes: int
    fused_tbs: float
    frac_of_copy: float
    floor_ms: float
    paper_speedup: Optional[float] = None  # the paper's fused vs naive ratio, their GPU and baseline


# Which of the paper's columns (file, column) corresponds to which of our rows.
PAPER_COLUMNS = {
    ("permute+pad bf16", "forward"): ("op_permute_pad.csv", "bf16_perm_pad_speedup"),
    ("permute+pad fp8", "forward"): ("op_permute_pad.csv", "fp8_perm_pad_speedup"),
    ("unpad+unpermute bf16", "forward"): ("op_permute_pad.csv", "bf16_unperm_unpad_speedup"),
    ("unpad+unpermute fp8 grad", "backward"): ("op_permute_pad.csv", "fp8_unperm_unpad_speedup"),
    ("swiglu+quant", "forward"): ("op_swiglu_quant.csv", "fwd_speedup"),
    ("swiglu+quant", "backward"): ("op_swiglu_quant.csv", "bwd_speedup"),
}


def _paper_speedup(op: str, direction: str, shape: str) -> Optional[float]:
    file_col = PAPER_COLUMNS.get((op, direction))
    row = common.paper_rows(file_col[0]).get(shape) if file_col else None
    return float(row[file_col[1]]) if row else None


def _flat(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def _check_same(op: str, fused: Callable, baseline: Callable) -> None:
    """Fused and unfused data movement must give the same bits (checked before timing)."""
    for a, b in zip(_flat(fused()), _flat(baseline())):
        if a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            raise AssertionError(f"{op}: fused and baseline outputs differ")


def _row(op, shape, direction, fused: Callable, baseline: Callable, eager: Callable, nbytes: int, device,
         exact: bool = True) -> OpRow:
    if exact:
        _check_same(f"{op} {direction} {shape}", fused, baseline)
    t_f, t_b, t_e = common.bench_ms(fused), common.bench_ms(baseline), common.bench_ms(eager)
    t_copy = common.copy_ms(nbytes, device)
    bw = nbytes / (t_f * 1e-3) / 1e12
    copy_bw = (nbytes // 2 * 2) / (t_copy * 1e-3) / 1e12
    return OpRow(op, shape, direction, t_f, t_b, t_e, t_b / t_f, t_e / t_f, nbytes, bw, bw / copy_bw,
                 nbytes / COPY_BANDWIDTH_FLOOR * 1e3, _paper_speedup(op, direction, shape))


def _routing(n, e, topk, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.rand(n, e, generator=g).topk(topk, dim=1).indices
    rm = torch.zeros(n, e, dtype=torch.bool)
    rm.scatter_(1, idx, True)
    return rm.to(device), torch.rand(n, e, generator=g).to(device)


def _pad_map(perm: ops.Permutation, unpadded: ops.Permutation):
    """Row map of the pad step: unpadded grouped row i -> its padded row, as [M, 1] int32."""
    m = unpadded.num_out_rows
    dev = perm.row_map.device
    rows = torch.arange(m, device=dev, dtype=torch.int32)
    expert = torch.searchsorted(unpadded.offsets[1:], rows, right=True)
    return (rows + perm.offsets[expert] - unpadded.offsets[expert]).to(torch.int32)[:, None].contiguous()


def bench_permute(e, h, topk, device) -> list:
    n = TOKENS
    rm, probs = _routing(n, e, topk, device, seed=e + h)
    perm = ops.plan_permutation(rm, topk, 16)
    flat = ops.plan_permutation(rm, topk, 1)  # the single-pass permute of the baseline
    pad_map = _pad_map(perm, flat)
    m, mp = flat.num_out_rows, perm.num_out_rows
    x = torch.randn(n, h, device=device).bfloat16()
    q = fp8.quantize(x)
    # Eager index lists (built outside the timed region for every path).
    tok_sorted = rm.t().nonzero()[:, 1]
    padded_pos = pad_map[:, 0].long()
    shape = f"({TOKENS}, {e}, {h}, {topk})"
    rows = []

    for name, src, scales, esize in (("bf16", x, None, 2), ("fp8", q.data, q.scale_inv, 1)):
        sb = 0 if scales is None else h // 128 * 4

        def fused(src=src, scales=scales):
            return scatter_rows(src, perm.row_map, perm.counts, perm.offsets, mp, 16, scales, probs, perm.slot_expert)

        def baseline(src=src, scales=scales):
            a, s, p = scatter_rows(src, flat.row_map, flat.counts, flat.offsets, m, 1, scales, probs, flat.slot_expert)
            return scatter_rows(a, pad_map, flat.counts, perm.offsets, mp, 16, s, p[:, None], torch.zeros_like(pad_map))

        def eager(src=src, scales=scales):
            perm_rows = src.view(torch.uint8 if esize == 1 else src.dtype).index_select(0, tok_sorted)
            out = torch.zeros(mp, h, dtype=perm_rows.dtype, device=device)
            out.index_copy_(0, padded_pos, perm_rows)
            if scales is not None:
                out_s = torch.zeros(mp, h // 128, device=device)
                out_s.index_copy_(0, padded_pos, scales.index_select(0, tok_sorted))
            return out

        nbytes = n * (h * esize + sb) + n * topk * 4 + mp * (h * esize + sb + 4)
        rows.append(_row(f"permute+pad {name}", shape, "forward", fused, baseline, eager, nbytes, device))

    g_rows = torch.randn(mp, h, device=device).bfloat16()
    g_probs = torch.randn(mp, device=device)
    rows.append(_row(
        "permute+pad bf16", shape, "backward",
        lambda: gather_sum_rows(g_rows, perm.row_map, n, g_probs, perm.slot_expert, e),
        lambda: (gather_sum_rows(gather_sum_rows(g_rows, pad_map, m)[0], flat.row_map, n, g_probs[padded_pos],
                                 flat.slot_expert, e)),
        lambda: torch.zeros(n, h, device=device).index_add_(0, tok_sorted, g_rows.index_select(0, padded_pos).float()).bfloat16(),
        m * h * 2 + n * h * 2 + m * 4 + n * e * 4, device,
    ))
    return rows


def bench_unpermute(e, h, topk, device) -> list:
    n = TOKENS
    rm, _ = _routing(n, e, topk, device, seed=e + h + 1)
    perm = ops.plan_permutation(rm, topk, 16)
    flat = ops.plan_permutation(rm, topk, 1)
    pad_map = _pad_map(perm, flat)
    m, mp = flat.num_out_rows, perm.num_out_rows
    tok_sorted = rm.t().nonzero()[:, 1]
    padded_pos = pad_map[:, 0].long()
    y = torch.randn(mp, h, device=device).bfloat16()
    shape = f"({TOKENS}, {e}, {h}, {topk})"
    rows = [_row(
        "unpad+unpermute bf16", shape, "forward",
        lambda: gather_sum_rows(y, perm.row_map, n),
        lambda: gather_sum_rows(gather_sum_rows(y, pad_map, m)[0], flat.row_map, n),
        lambda: torch.zeros(n, h, device=device).index_add_(0, tok_sorted, y.index_select(0, padded_pos).float()).bfloat16(),
        m * h * 2 + n * h * 2, device,
    )]
    g = torch.randn(n, h, device=device).bfloat16()
    g8 = fp8.quantize(g)
    for name, src, scales, esize in (("bf16", g, None, 2), ("fp8", g8.data, g8.scale_inv, 1)):
        sb = 0 if scales is None else h // 128 * 4

        def fused(src=src, scales=scales):
            return scatter_rows(src, perm.row_map, perm.counts, perm.offsets, mp, 16, scales)

        def baseline(src=src, scales=scales):
            a, s, _ = scatter_rows(src, flat.row_map, flat.counts, flat.offsets, m, 1, scales)
            return scatter_rows(a, pad_map, flat.counts, perm.offsets, mp, 16, s)

        def eager(src=src, scales=scales):
            rows_ = src.view(torch.uint8 if esize == 1 else src.dtype).index_select(0, tok_sorted)
            out = torch.zeros(mp, h, dtype=rows_.dtype, device=device)
            return out.index_copy_(0, padded_pos, rows_)

        nbytes = n * (h * esize + sb) + mp * (h * esize + sb)
        rows.append(_row(f"unpad+unpermute {name} grad", shape, "backward", fused, baseline, eager, nbytes, device))
    return rows


def bench_swiglu(h, e, topk, f, device) -> list:
    m = TOKENS * topk
    x = torch.randn(m, 2 * f, device=device).bfloat16()
    w = torch.rand(m, device=device)
    g = torch.randn(m, f, device=device).bfloat16()
    shape = f"({TOKENS}, {h}, {e}, {topk}, {f})"

    def eager_fwd():
        a, b = x[:, :f].float(), x[:, f:].float()
        return fp8.quantize((torch.nn.functional.silu(a) * b * w[:, None]).bfloat16(), backend="reference")

    def eager_bwd():
        a, b = x[:, :f].float(), x[:, f:].float()
        sig = torch.sigmoid(a)
        gw = g.float() * w[:, None]
        dx = torch.cat([gw * b * sig * (1 + a * (1 - sig)), gw * a * sig], 1).bfloat16()
        return fp8.quantize(dx, backend="reference"), (g.float() * a * sig * b).sum(1)

    from ..kernels.quantize import quantize_rowwise

    sb = f // 128 * 4
    return [
        _row("swiglu+quant", shape, "forward",
             lambda: swiglu_quant_forward(x, w),
             lambda: quantize_rowwise(swiglu_quant_forward(x, w, torch.bfloat16, quantize=False)[2]),
             eager_fwd, m * (4 * f + 4) + m * (f + sb), device, exact=False),
        _row("swiglu+quant", shape, "backward",
             lambda: swiglu_quant_backward(g, x, w),
             lambda: quantize_rowwise(swiglu_quant_backward(g, x, w, torch.bfloat16)[0]),
             eager_bwd, m * (2 * f + 4 * f + 4) + m * (2 * f + 2 * sb + 4), device, exact=False),
    ]


def run(out_dir: Optional[str] = None, device=None, permute_shapes=None, swiglu_shapes=None) -> dict:
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("the MoE operator benchmark needs a CUDA GPU (it measures GPU kernels)")
        device = torch.device("cuda")
    common.warm_up(device)
    rows = []
    for e, h, k in permute_shapes or PERMUTE_SHAPES:
        rows += bench_permute(e, h, k, device)
        rows += bench_unpermute(e, h, k, device)
    for h, e, k, f in swiglu_shapes or SWIGLU_SHAPES:
        rows += bench_swiglu(h, e, k, f, device)
    return save_result({**environment(device), "rows": [asdict(r) for r in rows]}, out_dir, "moe_ops.json")


def render(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, torch {result['torch']}, triton {result['triton']}",
        "",
        "| op | shape | direction | fused ms | baseline ms | eager ms | vs baseline | vs eager | "
        "fused bytes | TB/s | of copy | floor ms | paper fused vs naive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        paper = r.get("paper_speedup")
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['direction']} | {r['fused_ms']:.4f} | {r['baseline_ms']:.4f} | "
            f"{r['eager_ms']:.4f} | {r['speedup']:.2f}x | {r['speedup_vs_eager']:.2f}x | {r['fused_bytes']} | "
            f"{r['fused_tbs']:.2f} | {100 * r['frac_of_copy']:.0f}% | {r['floor_ms']:.4f} | "
            f"{f'{paper:.2f}x' if paper else '-'} |"
        )
    return "\n".join(lines)
