"""BF16 grouped GEMMs for the bf16 precision mode: the strongest baseline we can run.

Two engines behind one pair of functions: ``torch`` (``torch._grouped_mm``, any CUDA GPU with
it, and CPU) and ``deepgemm`` (DeepGEMM's bf16 M-grouped GEMMs and its K-grouped wgrad, which
accumulates into fp32 in place). ``auto`` follows the measurements in BENCHMARKS.md: with the
weight gradients going into fp32 main gradients, DeepGEMM on Hopper (when it imports and the
groups are padded to its alignment) was faster at every expert count; written once in bf16,
the two were within a few percent either way, and torch needs no alignment.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..fp8.format import GroupSplits
from . import deepgemm as dg
from .contract import stacked_view

ENGINES = ("auto", "torch", "deepgemm")


def resolve_engine(engine: str, device, sizes: Sequence[int], into_main_grad: bool = False) -> str:
    """The engine ``engine`` means here. ``auto``: DeepGEMM when the weight gradients go into
    fp32 main gradients (its K-grouped wgrad accumulates in place), it runs here and the groups
    are aligned; torch otherwise (written once in bf16 the two measured within a few percent)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown bf16 GEMM engine {engine!r}; expected one of {ENGINES}")
    device = torch.device(device)
    if engine == "auto":
        if (into_main_grad and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
                and dg.available() and all(s % dg.alignment() == 0 for s in sizes)):
            return "deepgemm"
        return "torch"
    if engine == "deepgemm":
        dg.DeepGemmBackend().check_device(device)
        bad = [s for s in sizes if s % dg.alignment()]
        if bad:
            raise ValueError(f"DeepGEMM's bf16 grouped GEMMs need groups padded to {dg.alignment()} rows; got {bad[:4]}")
    return engine


def grouped_mm(a: torch.Tensor, w: torch.Tensor, groups: GroupSplits, engine: str, transpose: bool = True):
    """out[g] = a[g] @ w[g]^T (``transpose=False``: a[g] @ w[g]) in bf16, fp32 accumulate, one
    launch; ``w`` is the stacked [G, N, K] weights."""
    n = w.shape[1] if transpose else w.shape[2]
    if a.shape[0] == 0:
        return a.new_empty(0, n)
    if engine == "deepgemm":
        out = torch.empty(a.shape[0], n, dtype=torch.bfloat16, device=a.device)
        if transpose:
            dg.library().m_grouped_bf16_gemm_nt_contiguous(a, w, out, **dg.grouped_rows_call_args(groups))
        else:  # the NN form takes no tuned-for row count: keep the proven per-row index
            dg.library().m_grouped_bf16_gemm_nn_contiguous(a, w, out, groups.row_group_index())
        return out
    b = w.transpose(-2, -1) if transpose else w
    return torch._grouped_mm(a, b, offs=groups.row_offsets[1:])


def grouped_wgrad(g: torch.Tensor, x: torch.Tensor, groups: GroupSplits, engine: str,
                  accumulate_into: Optional[List[torch.Tensor]], like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """dW[e] = g[e]^T @ x[e] for every expert: added into fp32 ``accumulate_into`` buffers, or
    written once in the dtype of ``like`` (empty groups give zeros / leave the buffers)."""
    sizes = groups.host_sizes()
    # DeepGEMM's kernel skips empty groups, leaving their buffers as they were
    if accumulate_into is not None and engine == "deepgemm" and any(sizes):
        d = stacked_view(list(accumulate_into))
        if d is not None:
            ks_dev = groups.sizes_device
            dg.library().k_grouped_bf16_gemm_tn_contiguous(g, x, d, list(sizes), ks_dev, c=d)
            return list(accumulate_into)
    if g.shape[0] == 0:
        prods = [None] * len(sizes)
    else:
        prods = list(torch._grouped_mm(g.t(), x, offs=groups.row_offsets[1:]).unbind(0))
    if accumulate_into is not None:
        for buf, p, rows in zip(accumulate_into, prods, sizes):
            if rows:
                buf += p
        return list(accumulate_into)
    return [torch.zeros_like(w) if (p is None or rows == 0) else p.to(w.dtype)
            for p, w, rows in zip(prods, like, sizes)]
