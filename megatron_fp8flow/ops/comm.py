"""Expert-parallel all-to-all for bf16 rows or FP8 rows (bytes + 1x128 scales), with autograd.

FP8 rows travel as their E4M3 bytes (viewed as uint8, which every backend moves) and their fp32
scales: (H + 4 H/128) bytes per row instead of 2 H. The backward sends the gradient the reverse
way in whatever form it arrives (bf16, or FP8 when the layer above quantized it).
Works with any torch.distributed backend that implements ``all_to_all_single`` (NCCL, gloo).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ..fp8.activation import FP8Activation, fp8_payload
from ..fp8.format import BlockwiseFP8Tensor, Layout


def _exchange(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all_rows(x, out_splits: List[int], in_splits: List[int], group: Optional[dist.ProcessGroup] = None):
    """Rows ``x`` [sum(in_splits), H] go to the ranks of ``group`` in chunks of ``in_splits``;
    returns the [sum(out_splits), H] rows received. ``x`` is a tensor or FP8 rows."""
    payload = fp8_payload(x)
    if payload is None:
        return _exchange(x, out_splits, in_splits, group)
    if payload.layout != Layout.ROWWISE:
        raise ValueError(f"only row-wise FP8 rows can be exchanged, got {payload.layout.value!r}")
    data = _exchange(payload.data.view(torch.uint8), out_splits, in_splits, group).view(payload.data.dtype)
    scale = _exchange(payload.scale_inv, out_splits, in_splits, group)
    q = BlockwiseFP8Tensor(data, scale, Layout.ROWWISE, (data.shape[0], payload.shape[1]), payload.pow2_scales)
    return FP8Activation(q, x.dtype) if isinstance(x, FP8Activation) else q


class AllToAllRows(torch.autograd.Function):
    """Autograd all-to-all of rows; bf16 or ``FP8Activation`` in both directions."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (list(out_splits), list(in_splits)), group
        return all_to_all_rows(x, ctx.splits[0], ctx.splits[1], group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None
