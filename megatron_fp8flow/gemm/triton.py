"""Triton backend: every product over all groups in one launch (:mod:`..kernels.grouped_gemm`).

Any group sizes, no per-group host cost, and the dgrad reads the forward weights transposed in
place (no transposed copies). Slower than the vendor GEMMs on Hopper; the backend for GPUs with
FP8 tensor cores but no blockwise vendor GEMM here (sm_89, sm_100+), and for CPU runs of the
kernels under the interpreter.
"""

from __future__ import annotations

import torch

from ..fp8.format import ColStorage
from .contract import GemmBackend, OperandLayouts, group_bounds, stacked_weights, store_product


class TritonBackend(GemmBackend):
    name = "triton"

    def layouts(self, device):
        return OperandLayouts(group_alignment=1, dgrad_weights="forward", colwise_storage=ColStorage.SIDE_BY_SIDE)

    def check_device(self, device):
        from ..kernels.fp8_common import check_launchable_device

        check_launchable_device(device)

    def fprop(self, a, weights, groups, out):
        return self._rowwise(a, weights, groups, out, transpose=False)

    def dgrad(self, grad, weights, groups, out):
        return self._rowwise(grad, weights, groups, out, transpose=True)

    def _rowwise(self, a, weights, groups, out, transpose):
        from ..kernels import grouped_gemm

        if not weights:
            return out
        # [G, N, K] views of the weights (no copy when they were quantized into one stacked
        # buffer); the transposed weights are the same view with the strides swapped.
        w_data, w_scale = stacked_weights(weights)
        if transpose:
            w_data, w_scale = w_data.transpose(1, 2), w_scale.transpose(1, 2)
        scale = a.scale_inv if a.scale_inv.stride(1) == 1 else a.scale_inv.contiguous()  # the kernel reads row-major
        return grouped_gemm.grouped_rowwise_gemm(a.data, scale, w_data, w_scale, groups, out)

    def wgrad(self, grad_col, x_col, groups, accumulate_into, out_dtype):
        from ..kernels import grouped_gemm

        for t in (grad_col, x_col):
            if t.col_storage != ColStorage.SIDE_BY_SIDE:
                raise ValueError("the Triton wgrad reads side-by-side column-wise operands "
                                 "(make them with storage='side_by_side')")
        n, k = grad_col.shape[1], x_col.shape[1]
        accumulate = accumulate_into is not None
        outs = list(accumulate_into) if accumulate else [None] * groups.num_groups
        stacked = torch.empty(groups.num_groups, n, k, dtype=torch.float32 if accumulate else out_dtype,
                              device=grad_col.device)
        grouped_gemm.grouped_wgrad(grad_col.data, grad_col.scale_inv, x_col.data, x_col.scale_inv,
                                   groups, stacked, accumulate=False)
        for i, (_, rows, _, _) in enumerate(group_bounds(groups)):
            outs[i] = store_product(outs[i], stacked[i] if rows else None, accumulate, (n, k), out_dtype,
                                    grad_col.device)
        return outs
