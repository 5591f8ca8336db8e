"""Scatter token rows into the expert-grouped, padded layout (permute+pad forward; also the
backward of unpad+unpermute). bf16 rows, or FP8 codes + 1x128 scales moved as bytes (no
arithmetic). One program reads a token's row chunk once and writes it to each of its rows;
extra programs zero the padding rows (data, scales, probs).

Reference: ``ops.reference.permute_pad`` / ``ops.reference.scatter_to_padded``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import empty_row_scales, with_row_scale_layout
from .fp8_common import use_cpu_path, check_launchable


@triton.jit
def _scatter_rows_kernel(
    src_ptr, src_scale_ptr, probs_ptr, row_map_ptr, slot_expert_ptr,
    dst_ptr, dst_scale_ptr, dst_probs_ptr, counts_ptr, offsets_ptr,
    N, H, num_experts, num_sb, stride_src_sm, stride_src_sk, stride_dst_sm, stride_dst_sk, stride_probs,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, ALIGN_P2: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_PROBS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    SB: tl.constexpr = BLOCK_H // 128  # scale blocks per chunk (FP8: BLOCK_H % 128 == 0)
    if pid < N:
        t = pid.to(tl.int64)
        row = tl.load(src_ptr + t * H + cols, mask=col_ok)
        if HAS_SCALES:
            sb = pid_h * SB + tl.arange(0, SB)
            s = tl.load(src_scale_ptr + t * stride_src_sm + sb * stride_src_sk, mask=sb < num_sb)
        for k in tl.static_range(TOPK):
            dst = tl.load(row_map_ptr + t * TOPK + k)
            ok = dst >= 0
            d64 = tl.maximum(dst, 0).to(tl.int64)
            # tl.where rather than `col_ok & ok`: Triton's interpreter turns a scalar condition broadcast into
            # a block into a non-bool mask, which 3.9 rejects; compiled, the two are the same.
            tl.store(dst_ptr + d64 * H + cols, row, mask=tl.where(ok, col_ok, False))
            if HAS_SCALES:
                tl.store(dst_scale_ptr + d64 * stride_dst_sm + sb * stride_dst_sk, s,
                         mask=tl.where(ok, sb < num_sb, False))
            if HAS_PROBS:
                if pid_h == 0:
                    e = tl.maximum(tl.load(slot_expert_ptr + t * TOPK + k), 0)
                    p = tl.load(probs_ptr + t * stride_probs + e)
                    tl.store(dst_probs_ptr + d64, p, mask=ok)
    else:
        # Padding rows of expert e: [offset + count, next offset).
        e = pid - N
        start = tl.load(offsets_ptr + e) + tl.load(counts_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        r = start + tl.arange(0, ALIGN_P2)
        r_ok = r < end
        r64 = r.to(tl.int64)
        zero = tl.zeros([ALIGN_P2, BLOCK_H], dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + r64[:, None] * H + cols[None, :], zero, mask=r_ok[:, None] & col_ok[None, :])
        if HAS_SCALES:
            sb = pid_h * SB + tl.arange(0, SB)
            tl.store(dst_scale_ptr + r64[:, None] * stride_dst_sm + sb[None, :] * stride_dst_sk,
                     tl.zeros([ALIGN_P2, SB], dtype=tl.float32), mask=r_ok[:, None] & (sb < num_sb)[None, :])
        if HAS_PROBS:
            if pid_h == 0:
                tl.store(dst_probs_ptr + r64, tl.zeros([ALIGN_P2], dtype=tl.float32), mask=r_ok)


def scatter_rows(
    src: torch.Tensor,
    row_map: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    num_out_rows: int,
    align: int,
    src_scales: torch.Tensor = None,
    probs: torch.Tensor = None,
    slot_expert: torch.Tensor = None,
    block_h: int = None,
    num_warps: int = 4,
    mn_major_scales: bool = False,
):
    """Returns (dst [num_out_rows, H], dst_scales or None, dst_probs or None); the scales
    row-major or MN-major (``fp8.format.empty_row_scales``).

    ``row_map``/``slot_expert`` are int32 [N, topk]; ``counts`` int32 [E]; ``offsets`` int32
    [E + 1] (cumulative padded sizes). FP8 data is moved through a uint8 view.
    """
    if use_cpu_path(src, row_map):
        dst, dst_scales, dst_probs = _scatter_rows_torch(src, row_map, num_out_rows, src_scales, probs, slot_expert)
        if dst_scales is not None:
            dst_scales = with_row_scale_layout(dst_scales, mn_major_scales)
        return dst, dst_scales, dst_probs
    check_launchable(src, row_map)
    n, h = src.shape
    topk = row_map.shape[1]
    e = counts.numel()
    dev = src.device
    moved = src.view(torch.uint8) if src.dtype == torch.float8_e4m3fn else src
    dst = torch.empty(num_out_rows, h, dtype=src.dtype, device=dev)
    dst_view = dst.view(torch.uint8) if src.dtype == torch.float8_e4m3fn else dst
    num_sb = 0 if src_scales is None else src_scales.shape[1]
    dst_scales = None if src_scales is None else empty_row_scales(num_out_rows, num_sb, dev, mn_major_scales)
    dst_probs = None if probs is None else torch.empty(num_out_rows, dtype=torch.float32, device=dev)
    if block_h is None:
        block_h = min(triton.next_power_of_2(max(h, 1)), 2048 if moved.element_size() == 1 else 1024)
        if src_scales is not None:
            block_h = max(block_h, 128)
    if (n + e) and h:
        grid = (n + e, triton.cdiv(h, block_h))
        dummy = counts
        _scatter_rows_kernel[grid](
            moved, src_scales if src_scales is not None else dummy,
            probs if probs is not None else dummy, row_map,
            slot_expert if slot_expert is not None else row_map,
            dst_view, dst_scales if dst_scales is not None else dummy,
            dst_probs if dst_probs is not None else dummy, counts, offsets,
            n, h, e, num_sb, *(src_scales.stride() if src_scales is not None else (0, 0)),
            *(dst_scales.stride() if dst_scales is not None else (0, 0)), probs.stride(0) if probs is not None else 0,
            TOPK=topk, BLOCK_H=block_h, ALIGN_P2=triton.next_power_of_2(max(align, 2)),
            HAS_SCALES=src_scales is not None, HAS_PROBS=probs is not None, num_warps=num_warps,
        )
    return dst, dst_scales, dst_probs


def _scatter_rows_torch(src, row_map, num_out_rows, src_scales=None, probs=None, slot_expert=None):
    """The kernel's result in plain PyTorch (CPU without the interpreter): rows copied to their
    slots, everything else zero. Bytes move unchanged, so the result is identical."""
    n, h = src.shape
    valid = row_map >= 0
    token = torch.arange(n).unsqueeze(1).expand_as(row_map)[valid]
    rows = row_map[valid].long()
    moved = src.view(torch.uint8) if src.dtype == torch.float8_e4m3fn else src
    dst = torch.zeros(num_out_rows, h, dtype=moved.dtype)
    dst[rows] = moved[token]
    if src.dtype == torch.float8_e4m3fn:
        dst = dst.view(torch.float8_e4m3fn)
    dst_scales = dst_probs = None
    if src_scales is not None:
        dst_scales = torch.zeros(num_out_rows, src_scales.shape[1], dtype=torch.float32)
        dst_scales[rows] = src_scales[token]
    if probs is not None:
        dst_probs = torch.zeros(num_out_rows, dtype=torch.float32)
        dst_probs[rows] = probs[token, slot_expert[valid].long()].float()
    return dst, dst_scales, dst_probs
