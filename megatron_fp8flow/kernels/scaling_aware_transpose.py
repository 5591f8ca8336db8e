"""Scaling-aware transpose (SAT): row-wise 1x128 FP8 -> grouped column-wise FP8 without BF16.

With power-of-two scales every element is re-encoded by an exponent shift,
``q' = RNE_e4m3(q * 2^(e_row - e_col))``, exact unless the result falls into the E4M3
subnormal range, where it rounds to nearest even.

``column`` variant: ``e_col`` is derived exactly from the codes and row scale exponents,
``e_col = max_i (e_row_i + t(q_i))`` with ``t(q)`` the smallest t such that ``|q| <= 448 * 2^t``.
Because ``ceil(log2(.))`` is monotone this equals the power-of-two scale of the exact column
amax of the dequantized values, so the output is bit-identical to
``quantize_colwise(dequantize(q))`` while reading only FP8 bytes and never forming a product
that could underflow.

``tile`` variant: ``e_col`` is the largest row scale exponent of the 128x128 tile (the
paper's choice). References: ``fp8.reference.quantize_colwise`` composed with dequantization,
and ``fp8.reference.sat_tile``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import BLOCK, FP8_DTYPE, GroupSplits, cdiv
from .fp8_common import (
    MIN_SCALE_EXP,
    NO_EXP,
    decode_e4m3,
    encode_e4m3,
    exp2_int,
    fp8_view,
    is_finite,
    locate_block,
    needs_emulated_cast,
    pow2_exponent,
    search_steps,
)


@triton.jit
def _sat_kernel(
    q_ptr, s_ptr, qt_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, num_kb, num_groups,
    BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr, EMULATE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    row_start, nrows = locate_block(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, SEARCH_STEPS)
    r = tl.arange(0, 128)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = r < nrows
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    rows = row_start + r
    rows64 = rows.to(tl.int64)

    q = tl.load(q_ptr + rows64[:, None] * K + cols[None, :], mask=mask, other=0)
    qf = decode_e4m3(q, EMULATE)
    # One row scale per row: BLOCK_K never straddles a 128-column scale block.
    s = tl.load(s_ptr + rows64 * num_kb + (pid_k * BLOCK_K) // 128, mask=row_ok, other=0.0)
    s_usable = is_finite(s) & (s > 0)
    e_row = tl.where(s_usable, ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, NO_EXP)
    # Elements that dequantize to NaN (NaN code, or a non-finite row scale).
    nan_out = (qf != qf) | (~is_finite(s))[:, None]

    if TILE_SCALE:
        e_tile = tl.max(e_row, axis=0)
        e_col = tl.where(e_tile > NO_EXP, e_tile, 0)
        e_col_b = e_col + tl.zeros([BLOCK_K], dtype=tl.int32)
    else:
        live = mask & (qf != 0) & (~nan_out) & s_usable[:, None]
        aq = tl.where(live, tl.abs(qf), 1.0)
        need = tl.where(live, e_row[:, None] + pow2_exponent(aq), NO_EXP)
        e_max = tl.max(need, axis=0)
        e_col_b = tl.where(e_max > NO_EXP, tl.maximum(e_max, MIN_SCALE_EXP), 0)

    # Shift in [-30, 17]: below -30 every |q| <= 448 lands under 2^-21 and rounds to zero,
    # so clamping keeps 2^shift a normal fp32 number without changing any result.
    shift = tl.minimum(tl.maximum(e_row[:, None] - e_col_b[None, :], -30), 30)
    v = qf * exp2_int(shift)
    v = tl.where(nan_out, float("nan"), v)
    out = tl.trans(encode_e4m3(v, EMULATE))
    tl.store(qt_ptr + cols.to(tl.int64)[:, None] * M + rows[None, :], out,
             mask=col_ok[:, None] & row_ok[None, :])
    tl.store(st_ptr + bid.to(tl.int64) * K + cols, exp2_int(e_col_b), mask=col_ok & (nrows > 0))


def scaling_aware_transpose(
    data: torch.Tensor,
    scale_inv: torch.Tensor,
    groups: GroupSplits,
    tile_scale: bool = False,
    block_k: int = 128,
    num_warps: int = 8,
):
    """Row-wise FP8 [M, K] -> column-wise FP8 (data [K, M], scale_inv [blocks, K]).

    ``scale_inv`` must hold power-of-two scales (the caller checks the tensor's flag).
    With device-side group sizes the output scale tensor has ``groups.scale_rows_capacity``
    rows and rows past the real block count are zero.
    """
    if block_k not in (32, 64, 128):
        raise ValueError(f"block_k must be 32, 64 or 128, got {block_k}")
    m, k = data.shape
    num_kb = cdiv(k, BLOCK)
    dev = data.device
    data_t = torch.empty(k, m, dtype=FP8_DTYPE, device=dev)
    alloc = torch.empty if groups.exact else torch.zeros
    scale_t = alloc(groups.scale_rows_capacity, k, dtype=torch.float32, device=dev)
    if m and k and groups.scale_rows_capacity:
        emulate = needs_emulated_cast(dev)
        grid = (groups.scale_rows_capacity, cdiv(k, block_k))
        _sat_kernel[grid](
            fp8_view(data, emulate), scale_inv, fp8_view(data_t, emulate), scale_t,
            groups.scale_row_offsets, groups.row_offsets,
            m, k, num_kb, groups.num_groups,
            BLOCK_K=block_k, TILE_SCALE=tile_scale, EMULATE=emulate,
            SEARCH_STEPS=search_steps(groups.num_groups), num_warps=num_warps,
        )
    return data_t, scale_t
