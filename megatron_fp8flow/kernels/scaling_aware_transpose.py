"""Scaling-aware transpose (SAT): row-wise 1x128 FP8 -> grouped column-wise FP8 without BF16.

With power-of-two scales every element is re-encoded by an exponent shift,
``q' = RNE_e4m3(q * s_row / S)``, exact unless the result falls into the E4M3 subnormal
range, where it rounds to nearest even.

The kernel transposes the FP8 bytes of a 128-row x BLOCK_K tile first (one 8-bit layout
change), then works in the output orientation, where the per-column reduction runs along the
fast axis and the store is coalesced. In registers, ``q * s_row`` is formed in fp32: exact,
because an E4M3 value times a power of two >= 2^-126 needs at most 4 significant bits above
2^-138 (fp32 subnormals are kept on GPUs unless flush-to-zero is requested; tests cover scales
near 2^-126). No BF16 tensor is ever written.

``column`` variant: ``S`` is the power-of-two scale of the exact column amax, so the output is
bit-identical to ``quantize_colwise(dequantize(q))``. ``tile`` variant: ``S`` is the largest
usable row scale of the 128x128 tile (the paper's choice), counting only rows whose 1x128 block
holds a finite non-zero code. References:
``fp8.reference.quantize_colwise`` composed with dequantization, and ``fp8.reference.sat_tile``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import FP8_DTYPE, GroupSplits, cdiv
from .fp8_common import (
    decode_e4m3,
    encode_e4m3,
    exp2_int,
    fp8_view,
    groups_p2,
    is_finite,
    colwise_frame,
    locate_block_group,
    needs_emulated_cast,
    encode_e4m3_x4,
    reciprocal_pow2,
    scale_exponent_from_amax,
)


@triton.jit
def _holds_finite_nonzero(words):
    """[R, W] int32 words of 4 E4M3 codes each -> [R]: whether a row holds a finite non-zero
    code (the tile scale ignores the placeholder scale of all-zero blocks)."""
    m0 = words & 0x7F
    m1 = (words >> 8) & 0x7F
    m2 = (words >> 16) & 0x7F
    m3 = (words >> 24) & 0x7F
    hit = (((m0 != 0) & (m0 != 0x7F)) | ((m1 != 0) & (m1 != 0x7F)) | ((m2 != 0) & (m2 != 0x7F))
           | ((m3 != 0) & (m3 != 0x7F)))
    return tl.max(hit.to(tl.int32), axis=1) > 0


@triton.jit
def _sat_plane(qf, s, row_ok, tile_ok, C: tl.constexpr, TILE_SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """[C, 128] decoded codes in output orientation, [128] row scales -> (codes, [C] scales).
    ``tile_ok``: the rows whose block holds a finite non-zero code (read by the tile scale only)."""
    x = qf * s[None, :]  # exact dequantized values
    finite = is_finite(x) & row_ok[None, :]
    if TILE_SCALE:
        s_max = tl.max(tl.where(is_finite(s) & row_ok & tile_ok, s, 0.0), axis=0)
        scale = tl.where(s_max > 0, s_max, 1.0) + tl.zeros([C], dtype=tl.float32)
    else:
        amax = tl.max(tl.where(finite, tl.abs(x), 0.0), axis=1)
        scale = exp2_int(scale_exponent_from_amax(amax))
    v = tl.where(finite, x * reciprocal_pow2(scale)[:, None], float("nan"))
    return encode_e4m3(v, EMULATE), scale


@triton.jit
def _sat_words_kernel(
    q32_ptr, s_ptr, qt_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, stride_sm, stride_sk, num_groups,
    BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr, TILE_SCALE: tl.constexpr,
    EMULATE: tl.constexpr, GROUPS_P2: tl.constexpr, PER_GROUP: tl.constexpr,
):
    """K % 4 == 0: transpose 32-bit words (4 codes of a row), then split them into 4 byte planes.

    Each plane is already in output orientation (row k = 4w + j, codes along m), so no 8-bit
    transpose is needed. A program walks CHUNKS column chunks of one 128-row block.
    """
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grp, row_start, nrows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    out_base, out_ld = colwise_frame(grp, row_offsets_ptr, M, K, PER_GROUP)
    WB: tl.constexpr = BLOCK_K // 4
    r = tl.arange(0, 128)
    wl = tl.arange(0, WB)
    row_ok = r < nrows
    rows = row_start + r
    rows64 = rows.to(tl.int64)
    K4 = K // 4
    for c in range(CHUNKS):
        kc = pid_k * CHUNKS + c
        chunk_ok = kc * BLOCK_K < K
        w = kc * WB + wl
        w_ok = w < K4
        a = tl.load(q32_ptr + rows64[:, None] * K4 + w[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0)
        s = tl.load(s_ptr + rows64 * stride_sm + ((kc * BLOCK_K) // 128) * stride_sk,
                    mask=tl.where(chunk_ok, row_ok, False), other=0.0)
        if TILE_SCALE:
            tile_ok = _holds_finite_nonzero(a)
        else:
            tile_ok = row_ok
        t = tl.trans(a)  # [WB, 128] words, output orientation
        for j in tl.static_range(4):
            byte = ((t >> (8 * j)) & 0xFF).to(tl.uint8)
            if EMULATE:
                qf = decode_e4m3(byte, EMULATE)
            else:
                qf = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            codes, scale = _sat_plane(qf, s, row_ok, tile_ok, WB, TILE_SCALE, EMULATE)
            k = kc * BLOCK_K + 4 * wl + j
            tl.store(qt_ptr + out_base + k.to(tl.int64)[:, None] * out_ld + rows[None, :], codes,
                     mask=w_ok[:, None] & row_ok[None, :])
            tl.store(st_ptr + bid.to(tl.int64) * K + k, scale, mask=tl.where(nrows > 0, w_ok, False))


@triton.jit
def _sat_plane_x4(q0, q1, q2, q3, s0, s1, s2, s3, ok0, ok1, ok2, ok3, t0, t1, t2, t3, WB: tl.constexpr,
                  TILE_SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """Like _sat_plane for 4 interleaved row sets (row 4g + i in q_i [32, WB]): packed codes.
    ``t0``..``t3``: each set's rows whose block holds a finite non-zero code."""
    x0 = q0 * s0[:, None]
    x1 = q1 * s1[:, None]
    x2 = q2 * s2[:, None]
    x3 = q3 * s3[:, None]
    f0 = is_finite(x0) & ok0[:, None]
    f1 = is_finite(x1) & ok1[:, None]
    f2 = is_finite(x2) & ok2[:, None]
    f3 = is_finite(x3) & ok3[:, None]
    if TILE_SCALE:
        m01 = tl.maximum(tl.where(is_finite(s0) & ok0 & t0, s0, 0.0), tl.where(is_finite(s1) & ok1 & t1, s1, 0.0))
        m23 = tl.maximum(tl.where(is_finite(s2) & ok2 & t2, s2, 0.0), tl.where(is_finite(s3) & ok3 & t3, s3, 0.0))
        s_max = tl.max(tl.maximum(m01, m23), axis=0)
        scale = tl.where(s_max > 0, s_max, 1.0) + tl.zeros([WB], dtype=tl.float32)
    else:
        a = tl.maximum(tl.maximum(tl.where(f0, tl.abs(x0), 0.0), tl.where(f1, tl.abs(x1), 0.0)),
                       tl.maximum(tl.where(f2, tl.abs(x2), 0.0), tl.where(f3, tl.abs(x3), 0.0)))
        scale = exp2_int(scale_exponent_from_amax(tl.max(a, axis=0)))
    inv = reciprocal_pow2(scale)[None, :]
    nan = float("nan")
    word = encode_e4m3_x4(tl.where(f0, x0 * inv, nan), tl.where(f1, x1 * inv, nan),
                          tl.where(f2, x2 * inv, nan), tl.where(f3, x3 * inv, nan), EMULATE)
    return word, scale


@triton.jit
def _decode_byte(words, j: tl.constexpr, EMULATE: tl.constexpr):
    byte = ((words >> (8 * j)) & 0xFF).to(tl.uint8)
    if EMULATE:
        return decode_e4m3(byte, EMULATE)
    else:
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _sat_packed_kernel(
    q32_ptr, s_ptr, qt32_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, stride_sm, stride_sk, num_groups,
    BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr, EMULATE: tl.constexpr, GROUPS_P2: tl.constexpr,
    PER_GROUP: tl.constexpr,
):
    """K % 4 == 0 and every group a multiple of 4 rows: 4x4 byte transposes in registers.

    Rows are read as 4 interleaved sets (row 4g + i); for output row k = 4w + j, byte j of word
    w of the 4 rows 4g..4g+3 forms one output word, so loads and stores are 32-bit and only a
    32-bit tile transpose remains.
    """
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grp, row_start, nrows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    out_base, out_ld = colwise_frame(grp, row_offsets_ptr, M, K, PER_GROUP)  # in bytes; all multiples of 4 here
    WB: tl.constexpr = BLOCK_K // 4
    g = tl.arange(0, 32)
    row0 = row_start + 4 * g  # first of each group of 4 rows
    ok0 = 4 * g < nrows
    ok1 = 4 * g + 1 < nrows
    ok2 = 4 * g + 2 < nrows
    ok3 = 4 * g + 3 < nrows
    K4 = K // 4
    w = pid_k * WB + tl.arange(0, WB)
    w_ok = w < K4
    s_base = s_ptr + row0.to(tl.int64) * stride_sm + ((pid_k * BLOCK_K) // 128) * stride_sk
    s0 = tl.load(s_base, mask=ok0, other=0.0)
    s1 = tl.load(s_base + stride_sm, mask=ok1, other=0.0)
    s2 = tl.load(s_base + 2 * stride_sm, mask=ok2, other=0.0)
    s3 = tl.load(s_base + 3 * stride_sm, mask=ok3, other=0.0)
    base = q32_ptr + row0.to(tl.int64)[:, None] * K4 + w[None, :]
    ld_mask = ok0[:, None] & w_ok[None, :]  # groups are multiples of 4 rows
    a0 = tl.load(base, mask=ld_mask, other=0)
    a1 = tl.load(base + K4, mask=ld_mask, other=0)
    a2 = tl.load(base + 2 * K4, mask=ld_mask, other=0)
    a3 = tl.load(base + 3 * K4, mask=ld_mask, other=0)
    ld4 = out_ld // 4
    base4 = out_base // 4
    out_g = row_start // 4 + g
    if TILE_SCALE:
        t0, t1 = _holds_finite_nonzero(a0), _holds_finite_nonzero(a1)
        t2, t3 = _holds_finite_nonzero(a2), _holds_finite_nonzero(a3)
    else:
        t0, t1, t2, t3 = ok0, ok1, ok2, ok3
    for j in tl.static_range(4):
        word, scale = _sat_plane_x4(
            _decode_byte(a0, j, EMULATE), _decode_byte(a1, j, EMULATE),
            _decode_byte(a2, j, EMULATE), _decode_byte(a3, j, EMULATE),
            s0, s1, s2, s3, ok0, ok1, ok2, ok3, t0, t1, t2, t3, WB, TILE_SCALE, EMULATE,
        )
        k = pid_k * BLOCK_K + 4 * tl.arange(0, WB) + j
        tl.store(qt32_ptr + base4 + k.to(tl.int64)[:, None] * ld4 + out_g[None, :], tl.trans(word),
                 mask=w_ok[:, None] & ok0[None, :])
        tl.store(st_ptr + bid.to(tl.int64) * K + k, scale, mask=tl.where(nrows > 0, w_ok, False))


@triton.jit
def _sat_bytes_kernel(
    q_ptr, s_ptr, qt_ptr, st_ptr, scale_row_offsets_ptr, row_offsets_ptr,
    M, K, stride_sm, stride_sk, num_groups,
    BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr, EMULATE: tl.constexpr,
    GROUPS_P2: tl.constexpr, PER_GROUP: tl.constexpr,
):
    """Any K: transposes the 8-bit tile (slower on the GPU than the word kernel)."""
    bid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grp, row_start, nrows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    out_base, out_ld = colwise_frame(grp, row_offsets_ptr, M, K, PER_GROUP)
    r = tl.arange(0, 128)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = r < nrows
    col_ok = cols < K
    rows = row_start + r
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :])
    # One row scale per row: BLOCK_K never straddles a 128-column scale block.
    s = tl.load(s_ptr + rows64 * stride_sm + ((pid_k * BLOCK_K) // 128) * stride_sk, mask=row_ok, other=0.0)
    # Decode, then transpose the fp32 values: tl.trans of an 8-bit tile can corrupt it on Hopper.
    qf = decode_e4m3(q, EMULATE)
    if TILE_SCALE:
        tile_ok = tl.max(tl.where(col_ok[None, :] & is_finite(qf) & (qf != 0), 1, 0), axis=1) > 0
    else:
        tile_ok = row_ok
    codes, scale = _sat_plane(tl.trans(qf), s, row_ok, tile_ok, BLOCK_K, TILE_SCALE, EMULATE)
    tl.store(qt_ptr + out_base + cols.to(tl.int64)[:, None] * out_ld + rows[None, :], codes,
             mask=col_ok[:, None] & row_ok[None, :])
    tl.store(st_ptr + bid.to(tl.int64) * K + cols, scale, mask=tl.where(nrows > 0, col_ok, False))


def scaling_aware_transpose(
    data: torch.Tensor,
    scale_inv: torch.Tensor,
    groups: GroupSplits,
    tile_scale: bool = False,
    block_k: int = 64,
    chunks: int = 1,
    num_warps: int = None,
    packed=None,
    per_group: bool = False,
):
    """Row-wise FP8 [M, K] -> column-wise FP8 (data [K, M], scale_inv [blocks, K]).

    ``per_group=True`` stores the data per group instead (flat [K * M], group g's [K, m_g]
    block at K * start_g; see ``fp8.format.ColStorage``).

    ``scale_inv`` must hold power-of-two scales (the caller checks the tensor's flag).
    With device-side group sizes the output scale tensor has ``groups.scale_rows_capacity``
    rows and rows past the real block count are zero. K % 4 == 0 takes a word kernel, the packed one
    when every group is a multiple of 4 rows (``groups.row_alignment``).
    """
    if block_k not in (32, 64, 128):
        raise ValueError(f"block_k must be 32, 64 or 128, got {block_k}")
    if tile_scale:
        block_k = 128  # a program sees whole 1x128 blocks: the tile scale asks which hold a code
    m, k = data.shape
    dev = data.device
    data_t = torch.empty(k * m if per_group else (k, m), dtype=FP8_DTYPE, device=dev)
    alloc = torch.empty if groups.exact else torch.zeros
    scale_t = alloc(groups.scale_rows_capacity, k, dtype=torch.float32, device=dev)
    if not (m and k and groups.scale_rows_capacity):
        return data_t, scale_t
    emulate = needs_emulated_cast(dev)
    if packed is None:
        packed = k % 4 == 0 and m % 4 == 0 and groups.row_alignment % 4 == 0 and data.is_contiguous()
    if num_warps is None:
        num_warps = 2 if packed else 4  # fastest measured on the H200 (BENCHMARKS.md sweep)
    common = dict(TILE_SCALE=tile_scale, EMULATE=emulate, GROUPS_P2=groups_p2(groups.num_groups),
                  PER_GROUP=per_group, num_warps=num_warps)
    offsets = (groups.scale_row_offsets, groups.row_offsets, m, k, *scale_inv.stride(), groups.num_groups)
    if packed:
        grid = (groups.scale_rows_capacity, cdiv(k, block_k))
        _sat_packed_kernel[grid](
            data.view(torch.int32), scale_inv, data_t.view(torch.int32), scale_t, *offsets,
            BLOCK_K=block_k, **common,
        )
    elif k % 4 == 0 and data.is_contiguous():
        grid = (groups.scale_rows_capacity, cdiv(cdiv(k, block_k), chunks))
        _sat_words_kernel[grid](
            data.view(torch.int32), scale_inv, fp8_view(data_t, emulate), scale_t, *offsets,
            BLOCK_K=block_k, CHUNKS=chunks, **common,
        )
    else:
        grid = (groups.scale_rows_capacity, cdiv(k, block_k))
        _sat_bytes_kernel[grid](
            fp8_view(data.contiguous(), emulate), scale_inv, fp8_view(data_t, emulate), scale_t, *offsets,
            BLOCK_K=block_k, **common,
        )
    return data_t, scale_t
