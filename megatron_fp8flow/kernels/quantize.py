"""Activation quantization kernels: row-wise 1x128, and grouped column-wise (optionally with row-wise).

References: ``fp8.reference.quantize_rowwise`` / ``quantize_colwise``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import BLOCK, FP8_DTYPE, GroupSplits, cdiv, empty_row_scales
from .fp8_common import colwise_frame, fp8_view, groups_p2, locate_block_group, needs_emulated_cast, quantize_tile


@triton.jit
def _quantize_rowwise_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, stride_sk,
    BLOCK_M: tl.constexpr, POW2: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * 128 + tl.arange(0, 128)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = quantize_tile(x, 1, POW2, EMULATE)
    tl.store(q_ptr + rows64 * K + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + pid_k * stride_sk, s, mask=row_ok)


@triton.jit
def _quantize_grouped_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, stride_xm, stride_sm, stride_sk, num_groups,
    BLOCK_K: tl.constexpr, WRITE_ROWWISE: tl.constexpr, POW2: tl.constexpr,
    EMULATE: tl.constexpr, GROUPS_P2: tl.constexpr, PER_GROUP: tl.constexpr,
):
    """One 128-row block of one group x BLOCK_K columns: column-wise (and optionally row-wise) output.

    The row-wise part works in the load orientation; the column-wise part transposes the raw
    input tile first and works in the output orientation (reduction along the fast axis,
    coalesced store of the transposed codes).
    """
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grp, row_start, nrows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    out_base, out_ld = colwise_frame(grp, row_offsets_ptr, M, K, PER_GROUP)
    r = tl.arange(0, 128)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = r < nrows
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    rows = row_start + r
    rows64 = rows.to(tl.int64)[:, None]
    x_raw = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0)

    if WRITE_ROWWISE:  # BLOCK_K == 128: one row-wise block per row
        q_row, s_row = quantize_tile(x_raw.to(tl.float32), 1, POW2, EMULATE)
        tl.store(q_ptr + rows64 * K + cols[None, :], q_row, mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * stride_sm + pid_k * stride_sk, s_row, mask=row_ok)

    # Output orientation [BLOCK_K, 128]; masked-off rows were loaded as 0 and do not count.
    q_col, s_col = quantize_tile(tl.trans(x_raw).to(tl.float32), 1, POW2, EMULATE)
    tl.store(qt_ptr + out_base + cols.to(tl.int64)[:, None] * out_ld + rows[None, :], q_col,
             mask=col_ok[:, None] & row_ok[None, :])
    tl.store(st_ptr + bid.to(tl.int64) * K + cols, s_col, mask=tl.where(nrows > 0, col_ok, False))


@triton.jit
def _quantize_colwise_bf16_words_kernel(
    x32_ptr, qt_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, stride_xw, num_groups,
    BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr, POW2: tl.constexpr,
    EMULATE: tl.constexpr, GROUPS_P2: tl.constexpr, PER_GROUP: tl.constexpr,
):
    """Column-wise only, bf16 input, K even: read 32-bit words (2 elements of a row), transpose
    words, split the halves. Each half-plane is in output orientation (row k = 2w + j, values
    along m), so no 16-bit transpose is needed.
    """
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grp, row_start, nrows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    out_base, out_ld = colwise_frame(grp, row_offsets_ptr, M, K, PER_GROUP)
    WB: tl.constexpr = BLOCK_K // 2
    r = tl.arange(0, 128)
    wl = tl.arange(0, WB)
    row_ok = r < nrows
    rows = row_start + r
    rows64 = rows.to(tl.int64)
    K2 = K // 2
    for c in range(CHUNKS):
        kc = pid_k * CHUNKS + c
        w = kc * WB + wl
        w_ok = w < K2
        a = tl.load(x32_ptr + rows64[:, None] * stride_xw + w[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0)
        t = tl.trans(a)  # [WB, 128]; masked-off rows were loaded as 0 and do not count
        for j in tl.static_range(2):
            if j == 0:
                x = (t << 16).to(tl.float32, bitcast=True)
            else:
                x = (t & -65536).to(tl.float32, bitcast=True)
            q_col, s_col = quantize_tile(x, 1, POW2, EMULATE)
            k = kc * BLOCK_K + 2 * wl + j
            tl.store(qt_ptr + out_base + k.to(tl.int64)[:, None] * out_ld + rows[None, :], q_col,
                     mask=w_ok[:, None] & row_ok[None, :])
            tl.store(st_ptr + bid.to(tl.int64) * K + k, s_col, mask=tl.where(nrows > 0, w_ok, False))


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"FP8 quantization expects a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"FP8 quantization expects bf16, fp16 or fp32 input, got {x.dtype}")


def quantize_rowwise(x: torch.Tensor, pow2_scales: bool = True, block_m: int = 16, num_warps: int = 4,
                     mn_major_scales: bool = False):
    """Row-wise 1x128 quantization. Returns (data [M, K] e4m3, scale_inv [M, ceil(K/128)]), the
    scales row-major or MN-major (``fp8.format.empty_row_scales``)."""
    _check_input(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    num_kb = cdiv(k, BLOCK)
    data = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale_inv = empty_row_scales(m, num_kb, x.device, mn_major_scales)
    if m and k:
        emulate = needs_emulated_cast(x.device)
        grid = (cdiv(m, block_m), num_kb)
        _quantize_rowwise_kernel[grid](
            x, fp8_view(data, emulate), scale_inv, m, k, x.stride(0), *scale_inv.stride(),
            BLOCK_M=block_m, POW2=pow2_scales, EMULATE=emulate, num_warps=num_warps,
        )
    return data, scale_inv


def quantize_grouped(
    x: torch.Tensor, groups: GroupSplits, pow2_scales: bool = True, write_rowwise: bool = True,
    block_k: int = 128, chunks: int = 1, num_warps: int = 4, per_group: bool = False,
    mn_major_scales: bool = False,
):
    """Column-wise (per group) and optionally row-wise quantization of ``x``.

    fp32/fp16 inputs (and bf16 with odd K) take one fused pass over ``x``. bf16 inputs with
    even K take the word kernel for the column-wise half and, when asked for, the row-wise
    kernel for the other half: two reads of ``x`` that measured faster on the H200 than the
    fused pass (see BENCHMARKS.md).

    Returns (row data, row scale_inv, col data [K, M] (``per_group``: flat, one [K, m_g] block
    per group), col scale_inv [blocks, K]); the row-wise
    pair is None when ``write_rowwise`` is False. With device-side group sizes the column-wise
    scale tensor has ``groups.scale_rows_capacity`` rows; rows past the real count are zero.
    """
    _check_input(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    num_kb = cdiv(k, BLOCK)
    dev = x.device
    data_t = torch.empty(k * m if per_group else (k, m), dtype=FP8_DTYPE, device=dev)
    alloc = torch.empty if groups.exact else torch.zeros
    scale_t = alloc(groups.scale_rows_capacity, k, dtype=torch.float32, device=dev)
    data = scale = None
    if write_rowwise:
        data = torch.empty(m, k, dtype=FP8_DTYPE, device=dev)
        scale = empty_row_scales(m, num_kb, dev, mn_major_scales)
    if not (m and k and groups.scale_rows_capacity):
        return data, scale, data_t, scale_t
    emulate = needs_emulated_cast(dev)
    offsets = (groups.scale_row_offsets, groups.row_offsets)
    gp2 = groups_p2(groups.num_groups)
    words_ok = (
        x.dtype == torch.bfloat16 and k % 2 == 0 and x.stride(0) % 2 == 0
        and x.storage_offset() % 2 == 0 and x.data_ptr() % 4 == 0
    )
    if words_ok:
        if write_rowwise:
            # Measured on the H200: the row-wise kernel plus the column-wise word kernel (two
            # reads of x) beat one fused pass over x (BENCHMARKS.md).
            data, scale = quantize_rowwise(x, pow2_scales, mn_major_scales=mn_major_scales)
        x32 = x.view(torch.int32)
        grid = (groups.scale_rows_capacity, cdiv(cdiv(k, block_k), chunks))
        _quantize_colwise_bf16_words_kernel[grid](
            x32, fp8_view(data_t, emulate), scale_t, *offsets, m, k, x32.stride(0), groups.num_groups,
            BLOCK_K=block_k, CHUNKS=chunks, POW2=pow2_scales, EMULATE=emulate, GROUPS_P2=gp2,
            PER_GROUP=per_group, num_warps=num_warps,
        )
        return data, scale, data_t, scale_t
    if write_rowwise:
        block_k = 128  # the row-wise scale spans 128 columns
    row_q = data if write_rowwise else data_t  # never written when WRITE_ROWWISE is False
    row_s = scale if write_rowwise else scale_t
    grid = (groups.scale_rows_capacity, cdiv(k, block_k))
    _quantize_grouped_kernel[grid](
        x, fp8_view(row_q, emulate), row_s, fp8_view(data_t, emulate), scale_t, *offsets,
        m, k, x.stride(0), *row_s.stride(), groups.num_groups,
        BLOCK_K=block_k, WRITE_ROWWISE=write_rowwise, POW2=pow2_scales, EMULATE=emulate,
        GROUPS_P2=gp2, PER_GROUP=per_group, num_warps=num_warps,
    )
    return data, scale, data_t, scale_t
