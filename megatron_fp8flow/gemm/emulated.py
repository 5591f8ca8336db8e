"""Emulated backend: exact dequantization and fp32 products, the same function on any device.

The reference the other backends are tested against, and what CPU runs use. Reads every layout.
"""

from __future__ import annotations

import torch

from ..fp8 import reference as ref
from ..fp8.format import group_column_blocks
from .contract import GemmBackend, OperandLayouts, group_bounds, inside_gemm, store_product


class EmulatedBackend(GemmBackend):
    name = "emulated"

    def layouts(self, device):
        return OperandLayouts(group_alignment=1, dgrad_weights="transposed")

    def fprop(self, a, weights, groups, out):
        with inside_gemm():  # the emulation's exact dequantization is the GEMM's arithmetic, not a cast
            x = ref.dequantize_rowwise(a.data, a.scale_inv)
            for (start, rows, _, _), w in zip(group_bounds(groups), weights):
                if rows:
                    wd = ref.dequantize_weight(w.data, w.scale_inv)
                    out[start: start + rows] = (x[start: start + rows] @ wd.t()).to(out.dtype)
        return out

    def wgrad(self, grad_col, x_col, groups, accumulate_into, out_dtype):
        n, k = grad_col.shape[1], x_col.shape[1]
        accumulate = accumulate_into is not None
        outs = list(accumulate_into) if accumulate else [None] * groups.num_groups
        dev = grad_col.device
        with inside_gemm():
            g_blocks = _dequantized_blocks(grad_col)
            x_blocks = _dequantized_blocks(x_col)
        for i, (gb, xb) in enumerate(zip(g_blocks, x_blocks)):
            prod = gb @ xb.t() if gb.shape[1] else None
            outs[i] = store_product(outs[i], prod, accumulate, (n, k), out_dtype, dev)
        return outs


def _dequantized_blocks(t):
    """Each group's dequantized transposed data [K, m_g] (fp32), in either column-wise storage."""
    blocks, srow = [], 0
    for data in group_column_blocks(t):
        rows = data.shape[1]
        nb = -(-rows // 128)
        scale = t.scale_inv[srow: srow + nb]  # [nb, K]
        srow += nb
        if rows == 0:
            blocks.append(torch.zeros(data.shape, dtype=torch.float32, device=data.device))
            continue
        s = scale.repeat_interleave(128, dim=0)[:rows].t()  # [K, m_g]
        blocks.append(data.float() * s)
    return blocks
