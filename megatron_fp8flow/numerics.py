"""Numerics report: what each way of building the FP8 GEMM operands does to the numbers.

For three input families (Gaussian; heavy-tailed, i.e. per-token log-normal magnitudes;
outlier channels) it measures, on tokens grouped as a router would group them:

* row-wise 1x128 quantization error vs the source (the fprop/dgrad operand);
* independent row/col quantization of the same source (TE's BF16-centric way): the col
  operand's error, and how often the row and col operands hold different values for the same
  element (fprop and wgrad then see different numbers);
* dequantize + requantize of the row-wise tensor into the column-wise one (double
  quantization), with power-of-two and with fp32 scales: error vs the source and the extra
  error added by the second rounding;
* the scaling-aware transpose (Triton kernel): codes that differ from the dequantize +
  requantize path (must be 0 for the ``column`` variant), and the ``tile`` variant's error.

Errors are relative Frobenius norms ``||x_hat - x|| / ||x||`` in fp64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import fp8

KINDS = ("gaussian", "heavy-tailed", "outlier-channel")


def make_input(kind: str, m: int, k: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "heavy-tailed":
        x = x * torch.exp(1.5 * torch.randn(m, 1, generator=g))
    elif kind == "outlier-channel":
        cols = torch.randperm(k, generator=g)[: max(1, k // 100)]
        x[:, cols] *= 100.0
    elif kind != "gaussian":
        raise ValueError(f"unknown input kind {kind!r}; expected one of {KINDS}")
    return x.to(device=device, dtype=torch.bfloat16)


def router_splits(m: int, groups: int, seed: int) -> list:
    """Skewed group sizes summing to m (some groups empty), like a real router's."""
    g = torch.Generator().manual_seed(seed)
    w = -torch.log(torch.rand(groups, generator=g)) ** 2  # skewed, positive
    w[0] = 0.0  # one empty expert
    sizes = (w / w.sum() * m).floor().long()
    sizes[int(torch.argmax(sizes))] += m - int(sizes.sum())
    return [int(v) for v in sizes]


def _rel(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    """||a - b|| / ||x|| in fp64."""
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(x.double()))


@dataclass
class NumericsRow:
    kind: str
    rowwise_err: float
    te_col_err: float
    te_disagree_frac: float
    dqrq_pow2_err: float
    dqrq_pow2_added: float
    dqrq_fp32_err: float
    dqrq_fp32_added: float
    sat_column_code_mismatches: int
    sat_column_scale_mismatches: int
    sat_tile_err: float
    sat_tile_code_diff_frac: float
    elements: int


def analyze(kind: str, m: int, k: int, groups: int, seed: int, device) -> NumericsRow:
    return analyze_tensor(kind, make_input(kind, m, k, seed, device), router_splits(m, groups, seed + 1))


def analyze_tensor(kind: str, x: torch.Tensor, splits: list) -> NumericsRow:
    """The measures for one bf16 tensor [M, K] of tokens grouped by ``splits`` (``kind``: its
    label in the report)."""
    device = x.device
    m, k = x.shape
    xf = x.float()
    # On a GPU everything runs the kernels. On CPU only SAT goes through the (slow) Triton
    # interpreter: it is what the report checks against the reference path.
    be = "auto" if device.type == "cuda" else "reference"

    row = fp8.quantize(x, "rowwise", backend=be)
    row_dq = row.dequantize()
    # TE-style: row and col operands quantized independently from the same source.
    te_row, te_col = fp8.quantize_row_and_col(x, splits, backend=be)
    te_col_dq = te_col.dequantize()
    disagree = (te_row.dequantize() != te_col_dq).double().mean()

    # Double quantization: Q_col(DQ(Q_row(x))), power-of-two and fp32 scales.
    dqrq = fp8.quantize(row_dq, "colwise", m_splits=splits, backend=be)
    dq2 = dqrq.dequantize()
    row32 = fp8.quantize(x, "rowwise", pow2_scales=False, backend=be)
    row32_dq = row32.dequantize()
    dq2_32 = fp8.quantize(row32_dq, "colwise", m_splits=splits, pow2_scales=False, backend=be).dequantize()

    # Scaling-aware transpose on the FP8 bytes (always the kernel).
    sat = fp8.scaling_aware_transpose(row, splits, variant="column", backend="triton")
    code_mis = int((sat.data.view(torch.uint8) != dqrq.data.view(torch.uint8)).sum())
    scale_mis = int((sat.scale_inv != dqrq.scale_inv).sum())
    tile = fp8.scaling_aware_transpose(row, splits, variant="tile", backend="triton")
    tile_dq = tile.dequantize()

    return NumericsRow(
        kind=kind,
        rowwise_err=_rel(row_dq, xf, xf),
        te_col_err=_rel(te_col_dq, xf, xf),
        te_disagree_frac=float(disagree),
        dqrq_pow2_err=_rel(dq2, xf, xf),
        dqrq_pow2_added=_rel(dq2, row_dq, xf),
        dqrq_fp32_err=_rel(dq2_32, xf, xf),
        dqrq_fp32_added=_rel(dq2_32, row32_dq, xf),
        sat_column_code_mismatches=code_mis,
        sat_column_scale_mismatches=scale_mis,
        sat_tile_err=_rel(tile_dq, xf, xf),
        sat_tile_code_diff_frac=float((tile_dq != sat.dequantize()).double().mean()),
        elements=m * k,
    )


def check_args(m: int, k: int, groups: int) -> None:
    """Sizes the report can use (zero rows or columns give 0/0 = NaN errors; one group would be
    the empty one): ValueError naming the argument otherwise."""
    for name, value, low in (("m", m, 1), ("k", k, 1), ("groups", groups, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} = {value!r}: expected an integer >= {low}")


def run(m: int = 2048, k: int = 1024, groups: int = 8, seed: int = 0, device=None) -> list:
    check_args(m, k, groups)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            # The SAT rows must come from the kernel, not from the reference it is checked against.
            os.environ.setdefault("TRITON_INTERPRET", "1")
            device = torch.device("cpu")
    return [analyze(kind, m, k, groups, seed + i, device) for i, kind in enumerate(KINDS)]


def run_dump(path: str, device=None) -> list:
    """The measures on tensors saved in training (``fp8flow train --dump-experts``): every
    ``*.pt`` of a directory (or one file), tokens and output gradient of each."""
    import glob

    files = sorted(glob.glob(os.path.join(path, "**", "*.pt"), recursive=True)) if os.path.isdir(path) else [path]
    if not files:
        raise ValueError(f"{path}: no dumps (*.pt) found; write them with fp8flow train --dump-experts DIR")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = []
    for f in files:
        record = torch.load(f, map_location="cpu", weights_only=True)
        missing = {"step", "tokens", "splits", "output_grad"} - set(record)
        if missing:
            raise ValueError(f"{f}: not a dump of fp8flow train --dump-experts (missing {sorted(missing)})")
        name = os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)
        for what in ("tokens", "output_grad"):
            t = record[what].to(device)
            if t.dim() != 2 or t.shape[0] != sum(record["splits"]) or t.shape[1] % 128:
                raise ValueError(f"{f}: {what} has shape {tuple(t.shape)}; expected [{sum(record['splits'])}, K] "
                                 "with K a multiple of 128")
            rows.append(analyze_tensor(f"{name} {what}", t, record["splits"]))
    return rows


def render(rows: list, m: int, k: int, groups: int, device: str, title: str = ""):
    """A rich Table (metrics down, input families across)."""
    from rich.table import Table

    t = Table(title=title or f"FP8 E4M3 1x128 numerics: [{m} x {k}] bf16 tokens in {groups} skewed groups ({device})")
    t.add_column("measure", style="bold")
    for r in rows:
        t.add_column(r.kind, justify="right")

    def add(label, fmt, attr):
        t.add_row(label, *[fmt(getattr(r, attr)) for r in rows])

    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    err = lambda v: f"{v:.3e}"  # noqa: E731
    add("row-wise quantize: rel. error", err, "rowwise_err")
    add("independent col quantize (TE-style): rel. error", err, "te_col_err")
    add("  elements where row and col operands disagree", pct, "te_disagree_frac")
    add("DQ+RQ pow2 scales: rel. error vs source", err, "dqrq_pow2_err")
    add("  error added by the 2nd rounding", err, "dqrq_pow2_added")
    add("DQ+RQ fp32 scales: rel. error vs source", err, "dqrq_fp32_err")
    add("  error added by the 2nd rounding", err, "dqrq_fp32_added")
    add("SAT column: codes != DQ+RQ (must be 0)", str, "sat_column_code_mismatches")
    add("SAT column: scales != DQ+RQ (must be 0)", str, "sat_column_scale_mismatches")
    add("SAT tile: rel. error vs source", err, "sat_tile_err")
    add("  elements that differ from SAT column", pct, "sat_tile_code_diff_frac")
    return t
