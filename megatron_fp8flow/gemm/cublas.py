"""cuBLAS backend: one ``torch._scaled_mm`` with blockwise scales per non-empty group (Hopper).

Every per-group operand is prepared by a few calls for all groups (the loop only issues the
GEMMs), but the loop itself costs host time per group: at 32 experts the host, not the GPU,
can set the pace. That is what the DeepGEMM backend is for; this one needs nothing but PyTorch.

cuBLAS limits (PyTorch 2.11): every group's row count must be a multiple of 16; a reduction
dimension K with K/128 not a multiple of 4 is refused with a clear error on PyTorch versions
whose check wants unpadded 128x128 scales (given them, cuBLAS returns wrong results). Partial
1x128 blocks along tokens in the weight gradient (groups of 16 or 48 rows) are fine.
"""

from __future__ import annotations

from typing import List

import torch

from ..fp8.format import GroupSplits, group_column_blocks
from .contract import (GemmBackend, OperandLayouts, check_group_alignment, group_bounds, inside_gemm,
                       stacked_weights, store_product)

ALIGNMENT = 16  # cuBLAS FP8 GEMMs need 16-element-aligned leading dimensions


class CublasBackend(GemmBackend):
    name = "cublas"

    def layouts(self, device):
        return OperandLayouts(group_alignment=ALIGNMENT, dgrad_weights="transposed")

    def check_device(self, device):
        if device.type != "cuda":
            raise RuntimeError("the cuBLAS FP8 GEMM backend needs CUDA tensors; use backend='emulated' on CPU")
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:
            raise RuntimeError(
                f"blockwise FP8 GEMMs through cuBLAS need a Hopper GPU (sm_90); this GPU is sm_{cap[0]}{cap[1]}. "
                f"Use backend='emulated' (slow) or the bf16 mode."
            )

    def fprop(self, a, weights, groups, out):
        bounds = group_bounds(groups)
        sizes = [rows for _, rows, _, _ in bounds]
        check_group_alignment(sizes, ALIGNMENT, self.name)
        w_data, w_scales = weight_operands(weights) if weights else ((), ())
        with inside_gemm():
            for rows, a_part, a_scale, out_part, wd, ws in zip(
                sizes, torch.split(a.data, sizes), outer_major_group_scales(a.scale_inv, groups),
                torch.split(out, sizes), w_data, w_scales,
            ):
                if rows:
                    scaled_mm_blockwise(a_part, wd, a_scale, ws, out.dtype, out=out_part)
        return out

    def wgrad(self, grad_col, x_col, groups, accumulate_into, out_dtype):
        n, k = grad_col.shape[1], x_col.shape[1]
        bounds = group_bounds(groups)
        check_group_alignment([rows for _, rows, _, _ in bounds], ALIGNMENT, self.name)
        accumulate = accumulate_into is not None
        outs = list(accumulate_into) if accumulate else [None] * len(bounds)
        dev = grad_col.device
        with inside_gemm():
            for i, ((_, rows, srow, nb), g_part, x_part) in enumerate(
                    zip(bounds, group_column_blocks(grad_col), group_column_blocks(x_col))):
                prod = None
                if rows:
                    g_scale, x_scale = grad_col.scale_inv[srow: srow + nb], x_col.scale_inv[srow: srow + nb]
                    prod = torch._scaled_mm(g_part, x_part.t(), scale_a=g_scale.t(), scale_b=x_scale,
                                            out_dtype=torch.float32 if accumulate else out_dtype)
                outs[i] = store_product(outs[i], prod, accumulate, (n, k), out_dtype, dev)
        return outs


def weight_operands(weights):
    """cuBLAS's view of every weight: ``w.data.t()`` and its 128x128 scales [K/128, N/128], column
    stride K/128 rounded up to 4 floats (16 bytes), as PyTorch's check asks since it started
    padding (older PyTorch asks for the unpadded stride, see :func:`scaled_mm_blockwise`). Built
    for all experts at once over the stacked weights: a few calls whatever the expert count."""
    data, scale = stacked_weights(weights)
    data = data.transpose(1, 2)
    g, nb, kb = scale.shape
    ld = -(-kb // 4) * 4
    if ld != kb or not scale.is_contiguous():
        padded = scale.new_zeros(g, nb, ld)
        padded[:, :, :kb] = scale
        scale = padded[:, :, :kb]
    return data.unbind(0), scale.transpose(1, 2).unbind(0)


def outer_major_group_scales(scale: torch.Tensor, groups: GroupSplits) -> List[torch.Tensor]:
    """Each group's rows of 1x128 scales [rows_g, K/128] with strides (1, rows_g): the layout
    cuBLAS takes for a blockwise operand (outer dimension major, the group's own row count as its
    stride). One scatter for all groups into one buffer (group offsets read on the device, no
    sync); the groups are views of it."""
    m, kb = scale.shape
    sizes = groups.host_sizes()
    buf = torch.empty(m * kb, dtype=scale.dtype, device=scale.device)
    if m:
        dev = scale.device
        sizes_t = groups.sizes_device.long()
        grp = torch.repeat_interleave(torch.arange(len(sizes), device=dev), sizes_t, output_size=m)
        row_start, rows = groups.row_offsets[:-1].long()[grp], sizes_t[grp]
        # element (r, j) of group g goes to g's block [kb, rows_g] at start_g * kb: j * rows_g + (r - start_g)
        dst = (row_start * (kb - 1) + torch.arange(m, device=dev))[:, None] + torch.arange(kb, device=dev) * rows[:, None]
        buf[dst.reshape(-1)] = scale.reshape(-1)
    views, start = [], 0
    for r in sizes:
        views.append(buf.as_strided((r, kb), (1, r), start * kb))
        start += r
    return views


def scaled_mm_blockwise(a_data, b_data, scale_a, scale_b, out_dtype, out=None):
    try:
        return torch._scaled_mm(a_data, b_data, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, out=out)
    except RuntimeError as err:
        # PyTorch 2.11 refuses the padded stride above and, given the unpadded one with K/128 not a
        # multiple of 4, returns wrong results (measured on the H200): refuse that case ourselves.
        if "Invalid scaling configuration" in str(err) and scale_b.shape[0] % 4 and scale_b.stride(0) == 1:
            raise ValueError(
                f"cuBLAS blockwise FP8 GEMMs in PyTorch {torch.__version__} need K % 512 == 0 (K/128 scale "
                f"blocks a multiple of 4); got K = {a_data.shape[1]}. Use backend='emulated', or a PyTorch "
                f"that pads blockwise scales."
            ) from err
        raise
