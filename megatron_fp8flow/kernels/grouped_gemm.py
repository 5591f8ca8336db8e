"""Single-launch blockwise FP8 grouped GEMMs (all expert groups in one kernel).

The alternative to one ``torch._scaled_mm`` call per group: one launch per product whatever the
number of local experts, so the host cost does not grow with them.

* ``grouped_rowwise_gemm``: ``out[rows of g] = DQ(a[rows of g]) @ DQ(w_g)^T``; ``a`` row-wise
  1x128 [M, K], ``w_g`` 128x128 [N, K], addressed through strides so that stacked weights,
  and transposed copies laid side by side, need no copy. fprop and dgrad.
* ``grouped_wgrad``: ``dW_g = DQ(dy_g)^T @ DQ(x_g)`` from column-wise operands (1x128 blocks
  along the tokens of each group), fp32 accumulate, in place into fp32 buffers or written once.

Both follow DeepSeek-V3's promotion: each 128-deep slice of the reduction is one tensor-core
product, scaled by its two block scales and added to an fp32 accumulator, so the tensor cores'
limited accumulation precision never spans more than 128 products. Tiles of 128 rows are mapped
to groups on the device (``locate_block_group``): no host sync, empty groups cost nothing.

References: ``gemm.grouped_rowwise_gemm`` / ``gemm.grouped_wgrad`` with ``backend="emulated"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import GroupSplits
from .fp8_common import check_launchable, groups_p2, interpreter_active, locate_block_group, to_output_dtype


@triton.jit
def _grouped_rowwise_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    N, K, num_groups,
    stride_am, stride_asm, stride_wg, stride_wn, stride_wk, stride_wsg, stride_wsn, stride_wsk, stride_om,
    NUM_KB: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_P2: tl.constexpr, NUM_STAGES: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    bid = tl.program_id(0)
    pid_n = tl.program_id(1)
    g, row_start, rows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    if rows > 0:
        offs_m = tl.arange(0, 128)
        row_ok = offs_m < rows
        r64 = (row_start + offs_m).to(tl.int64)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols_n < N
        offs_k = tl.arange(0, 128)
        a_ptrs = a_ptr + r64[:, None] * stride_am + offs_k[None, :]
        w_base = w_ptr + g.to(tl.int64) * stride_wg
        w_ptrs = w_base + cols_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
        # Each column's weight scale block (a tile of 256 columns spans two).
        ws_ptrs = ws_ptr + g * stride_wsg + (cols_n // 128) * stride_wsn
        acc = tl.zeros([128, BLOCK_N], dtype=tl.float32)
        for kb in tl.range(0, NUM_KB, num_stages=NUM_STAGES):
            a = tl.load(a_ptrs + kb * 128, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + kb * 128 * stride_wk, mask=n_ok[:, None], other=0.0)
            sa = tl.load(as_ptr + r64 * stride_asm + kb, mask=row_ok, other=0.0)
            sw = tl.load(ws_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32) * (sa[:, None] * sw[None, :])
        out = to_output_dtype(acc, out_ptr.dtype.element_ty, EXACT_BF16)
        tl.store(out_ptr + r64[:, None] * stride_om + cols_n[None, :], out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_block(acc, rb, g_ptr, gs_ptr, x_ptr, xs_ptr, row_start, row_end, srow, cols_n, cols_k, n_ok, k_ok,
                 N, K, stride_gn, stride_xk):
    """Add one 128-token block of a group: its scales are one row of each scale tensor."""
    rows = row_start + rb * 128 + tl.arange(0, 128)
    r_ok = rows < row_end
    a = tl.load(g_ptr + cols_n.to(tl.int64)[:, None] * stride_gn + rows[None, :],
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(x_ptr + cols_k.to(tl.int64)[:, None] * stride_xk + rows[None, :],
                mask=k_ok[:, None] & r_ok[None, :], other=0.0)
    sa = tl.load(gs_ptr + (srow + rb).to(tl.int64) * N + cols_n, mask=n_ok, other=0.0)
    sb = tl.load(xs_ptr + (srow + rb).to(tl.int64) * K + cols_k, mask=k_ok, other=0.0)
    return acc + tl.dot(a, tl.trans(b), out_dtype=tl.float32) * (sa[:, None] * sb[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    g_ptr, gs_ptr, x_ptr, xs_ptr, out_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    N, K, stride_gn, stride_xk, stride_og,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr, NUM_STAGES: tl.constexpr,
    EXACT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    grp = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row_start = tl.load(row_offsets_ptr + grp)
    row_end = tl.load(row_offsets_ptr + grp + 1)
    srow = tl.load(scale_row_offsets_ptr + grp)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if INTERPRET:  # the interpreter's range() cannot take a bound loaded from memory
        rb = 0
        while rb * 128 < row_end - row_start:
            acc = _wgrad_block(acc, rb, g_ptr, gs_ptr, x_ptr, xs_ptr, row_start, row_end, srow, cols_n, cols_k,
                               n_ok, k_ok, N, K, stride_gn, stride_xk)
            rb += 1
    else:
        for rb in tl.range(0, tl.cdiv(row_end - row_start, 128), num_stages=NUM_STAGES):
            acc = _wgrad_block(acc, rb, g_ptr, gs_ptr, x_ptr, xs_ptr, row_start, row_end, srow, cols_n, cols_k,
                               n_ok, k_ok, N, K, stride_gn, stride_xk)
    out_ptrs = out_ptr + grp.to(tl.int64) * stride_og + cols_n.to(tl.int64)[:, None] * K + cols_k[None, :]
    mask = n_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, to_output_dtype(acc, out_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


def grouped_rowwise_gemm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    groups: GroupSplits,
    out: torch.Tensor,
    block_n: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``out[rows of g] = DQ(a) @ DQ(w[g])^T`` for all groups in one launch.

    ``w_data`` is [G, N, K] FP8 and ``w_scale`` [G, N/128, K/128] fp32, any strides (the
    transposed copies of weights laid side by side are a strided view of this form).
    """
    check_launchable(a_data, w_data, out)
    if block_n not in (32, 64, 128, 256):
        raise ValueError(f"block_n must be 32, 64, 128 or 256, got {block_n}")
    m, k = a_data.shape
    n = w_data.shape[1]
    if m == 0 or n == 0:
        return out
    grid = (groups.scale_rows_capacity, triton.cdiv(n, block_n))
    _grouped_rowwise_kernel[grid](
        a_data, a_scale, w_data, w_scale, out, groups.scale_row_offsets, groups.row_offsets,
        n, k, groups.num_groups,
        a_data.stride(0), a_scale.stride(0), w_data.stride(0), w_data.stride(1), w_data.stride(2),
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2), out.stride(0),
        NUM_KB=k // 128, BLOCK_N=block_n, GROUPS_P2=groups_p2(groups.num_groups), NUM_STAGES=num_stages,
        EXACT_BF16=interpreter_active(), num_warps=num_warps,
    )
    return out


def grouped_wgrad(
    g_data: torch.Tensor,
    g_scale: torch.Tensor,
    x_data: torch.Tensor,
    x_scale: torch.Tensor,
    groups: GroupSplits,
    out: torch.Tensor,
    accumulate: bool,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``out[g] (+)= DQ(dy_g)^T @ DQ(x_g)`` for all groups in one launch; ``out`` is [G, N, K].

    ``g_data`` [N, M] and ``x_data`` [K, M] are the column-wise storages (tokens along the last
    dimension), ``g_scale`` [S, N] and ``x_scale`` [S, K] their per-group 128-token block scales.
    Empty groups write zeros, or leave an accumulated buffer as it was.
    """
    check_launchable(g_data, x_data, out)
    n, k = g_data.shape[0], x_data.shape[0]
    if groups.num_groups == 0 or n == 0 or k == 0:
        return out
    if g_data.stride(1) != 1 or x_data.stride(1) != 1 or not out[0].is_contiguous():
        raise ValueError("grouped_wgrad (triton) needs token-contiguous operands and a contiguous [G, N, K] output")
    grid = (groups.num_groups, triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _grouped_wgrad_kernel[grid](
        g_data, g_scale, x_data, x_scale, out, groups.scale_row_offsets, groups.row_offsets,
        n, k, g_data.stride(0), x_data.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, ACCUMULATE=accumulate, NUM_STAGES=num_stages,
        EXACT_BF16=interpreter_active(), INTERPRET=interpreter_active(), num_warps=num_warps,
    )
    return out

